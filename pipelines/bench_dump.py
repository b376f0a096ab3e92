"""Teacher-dump benchmark: measured side by side in one run, on this machine.

  1. response tokens/s of the whole dump path (encode, score, build rows, write zstd Parquet)
     vs. the same engine's bare forward pass on the same inputs, for vllm and hf, on the tiny
     teacher and on an image-heavy SmolVLM-style teacher (image tokens ~10x the response tokens),
     with the share of vLLM's time spent on log-probs of positions that are thrown away;
  2. bytes per response token on disk at k = 8, 32, 64;
  3. KL(full teacher distribution || stored top-k + rest reconstruction), the rest mass spread
     evenly over the other tokens.

    python pipelines/bench_dump.py [--teacher DIR] [--n 256] [--skip-vllm]

Without --teacher a tiny teacher is trained briefly on a fresh world (a random-init teacher has
an almost flat distribution, which would flatter nothing and tell nothing about top-k loss).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _requests(encoder, records: list) -> list:
    """One scoring request per record (top-32), images processed once each, as the worker does."""
    from teacher_dump.worker import _request, encode_record, load_image

    out = []
    for r in records:
        image = load_image(r)[0]
        out.append(_request(encode_record(encoder, r, encoder.image_features(image))[0], image, 32))
    return out


def _throughput(label: str, teacher: Path, records: list, skip_vllm: bool) -> None:
    """dump/bare for both backends on one teacher, and where vLLM's prompt-logprob cost goes."""
    from shared.mllm import batch_inputs, load_encoder
    from teacher_dump.backends import HFBackend, VLLMBackend
    from teacher_dump.shard_writer import table_bytes
    from teacher_dump.worker import shard_rows

    encoder = load_encoder(teacher)
    requests = _requests(encoder, records)
    n_tokens = sum(len(r.positions) for r in requests)
    n_positions = sum(len(r.ids) - 1 for r in requests)
    n_image = sum(len(r.features.ids) for r in requests if r.features is not None)
    print(f"\n{label}: {len(records)} records, {n_tokens} response tokens, {n_image} image tokens "
          f"({n_image / n_tokens:.1f}x the response), {n_positions} scored positions")

    def dump_path(backend) -> None:
        rows, _ = shard_rows(backend, encoder, records, 32)
        table_bytes("mimic", rows)

    hf = HFBackend(teacher)

    def hf_bare() -> None:
        with torch.no_grad():
            for s in range(0, len(requests), hf.batch_size):
                chunk = requests[s : s + hf.batch_size]
                hf.model(**batch_inputs(encoder, [r.ids for r in chunk], [r.features for r in chunk]))

    hf_bare()
    t_bare, t_dump = _timed(hf_bare), _timed(lambda: dump_path(hf))
    print(f"  hf    bare forward {n_tokens / t_bare:9.0f}   dump k=32 {n_tokens / t_dump:9.0f} response tokens/s   "
          f"dump/bare {t_bare / t_dump:.2f}")
    if skip_vllm:
        return
    from vllm import SamplingParams

    engine = VLLMBackend(teacher, max_model_len=512)
    prompts = [{"prompt_token_ids": r.prompt_ids, "multi_modal_data": {"image": r.image}} for r in requests]

    def run(backend: VLLMBackend, **kw) -> float:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **kw)
        return _timed(lambda: backend.llm.generate(prompts, params, use_tqdm=False))

    run(engine)
    dump_path(engine)
    t_bare, t_target = run(engine), run(engine, prompt_logprobs=0, flat_logprobs=True)
    t_top = run(engine, prompt_logprobs=32, flat_logprobs=True)
    t_dump = _timed(partial(dump_path, engine))
    thrown = 1 - n_tokens / n_positions
    print(f"  vllm  bare forward {n_tokens / t_bare:9.0f}   dump k=32 {n_tokens / t_dump:9.0f} response tokens/s   "
          f"dump/bare {t_bare / t_dump:.2f}")
    print(f"  vllm  prompt log-probs cost {t_top - t_bare:.2f} s over the bare {t_bare:.2f} s (target only: "
          f"{t_target - t_bare:.2f} s); vLLM scores every prompt position, {thrown:.0%} of them prompt or image "
          f"positions lmod throws away: ~{(t_top - t_bare) * thrown / t_dump:.0%} of the dump's time")
    del engine  # its engine process ends before the next teacher's starts
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--n", type=int, default=256, help="mimic records")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()

    from shared.mllm import batch_inputs, load_encoder
    from shared.tiny_families import build_tiny_family, family_tokenizer
    from shared.world import make_world
    from teacher_dump.backends import HFBackend
    from teacher_dump.inputs import read_records
    from teacher_dump.shard_writer import table_bytes
    from teacher_dump.tiny_teacher import make_tiny_teacher
    from teacher_dump.worker import shard_rows

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-"))
    make_world(tmp / "world", seed=7, n_mimic=args.n, n_pref=0, n_eval=0)
    teacher = args.teacher
    if teacher is None:
        teacher = tmp / "teacher"
        make_world(tmp / "train_world", seed=0, n_mimic=2000, n_pref=0, n_eval=0)
        make_tiny_teacher(tmp / "train_world", teacher, steps=args.teacher_steps)
    records, _ = read_records(tmp / "world" / "mimic.jsonl", "mimic", None)

    print("1. throughput (best of 2, after warm-up), side by side")
    _throughput(f"tiny teacher {teacher}", teacher, records, args.skip_vllm)
    # Real MLLMs spend most positions on the image: a SmolVLM-style stand-in with image splitting
    # (5 crops of 16 tokens for the world's images) gives prompts of ~10x more image than response.
    heavy = build_tiny_family("smolvlm", tmp / "smolvlm_heavy", family_tokenizer(tmp / "tok"),
                              image_tokens_per_crop=16)
    _throughput("image-heavy SmolVLM-style teacher (random init)", heavy, records, args.skip_vllm)

    encoder = load_encoder(teacher)
    hf = HFBackend(teacher)
    requests = _requests(encoder, records)

    print("\n2. bytes per response token on disk (zstd Parquet, mimic rows)")
    full_rows = {}
    for k in (8, 32, 64):
        rows, tokens = shard_rows(hf, encoder, records, k)
        full_rows[k] = rows
        size = len(table_bytes("mimic", rows))
        print(f"  k={k:<3} {size / tokens:7.1f} B/token   ({size} bytes, {tokens} tokens)")

    print("\n3. KL(full || top-k + rest spread evenly), nats per response token")
    with torch.no_grad():
        full = []
        for r in requests:
            logits = hf.model(**batch_inputs(encoder, [r.ids], [r.features])).logits[0]
            full.append(torch.log_softmax(logits[torch.tensor(r.positions) - 1].double(), -1))
        logp = torch.cat(full)  # [N, V]
    vocab = logp.shape[-1]
    for k in (8, 32, 64):
        top = torch.topk(logp, k, dim=-1)
        rest = (1 - top.values.exp().sum(-1)).clamp_min(1e-12)
        logq = (rest / (vocab - k)).log()[:, None].expand_as(logp).clone()
        logq.scatter_(1, top.indices, top.values)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        print(f"  k={k:<3} mean KL {kl.mean():.2e}  max {kl.max():.2e}  mean rest mass {rest.mean():.2e}")
    stored = np.concatenate([np.asarray(r["rest_mass"]) for r in full_rows[32]])
    print(f"  (stored rest_mass at k=32: mean {stored.mean():.2e})")


if __name__ == "__main__":
    main()
