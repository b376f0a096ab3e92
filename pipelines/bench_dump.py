"""Teacher-dump benchmark: measured side by side in one run, on this machine.

  1. response tokens/s of the whole dump path (encode, score, build rows, write zstd Parquet)
     vs. the same engine's bare forward pass on the same inputs, for vllm and hf;
  2. bytes per response token on disk at k = 8, 32, 64;
  3. KL(full teacher distribution || stored top-k + rest reconstruction), the rest mass spread
     evenly over the other tokens.

    python pipelines/bench_dump.py [--teacher DIR] [--n 256] [--skip-vllm]

Without --teacher a tiny teacher is trained briefly on a fresh world (a random-init teacher has
an almost flat distribution, which would flatter nothing and tell nothing about top-k loss).
"""

from __future__ import annotations

import argparse
import tempfile
import time
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--n", type=int, default=256, help="mimic records")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()

    from shared.mllm import collate_images, load_encoder
    from shared.world import make_world
    from teacher_dump.backends import HFBackend, VLLMBackend
    from teacher_dump.inputs import read_records
    from teacher_dump.shard_writer import table_bytes
    from teacher_dump.tiny_teacher import make_tiny_teacher
    from teacher_dump.worker import _request, encode_record, load_image, shard_rows

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-"))
    make_world(tmp / "world", seed=7, n_mimic=args.n, n_pref=0, n_eval=0)
    teacher = args.teacher
    if teacher is None:
        teacher = tmp / "teacher"
        make_world(tmp / "train_world", seed=0, n_mimic=2000, n_pref=0, n_eval=0)
        make_tiny_teacher(tmp / "train_world", teacher, steps=args.teacher_steps)
    records, _ = read_records(tmp / "world" / "mimic.jsonl", "mimic", None)
    encoder = load_encoder(teacher)
    requests = []
    for r in records:
        image = load_image(r)[0]
        requests.append(_request(encode_record(encoder, r, encoder.image_features(image))[0], image, 32))
    n_tokens = sum(len(r.positions) for r in requests)
    print(f"teacher {teacher}, {len(records)} records, {n_tokens} response tokens, vocab {len(encoder.tokenizer)}")

    def dump_path(backend, k: int) -> tuple[list[dict], int]:
        rows, tokens = shard_rows(backend, encoder, records, k)
        table_bytes("mimic", rows)
        return rows, tokens

    print("\n1. throughput (response tokens/s, best of 2, after warm-up)")
    hf = HFBackend(teacher)
    from shared.mllm import pad_batch

    def hf_bare() -> None:
        with torch.no_grad():
            for s in range(0, len(requests), hf.batch_size):
                chunk = requests[s : s + hf.batch_size]
                ids, attn = pad_batch([r.ids for r in chunk], hf.pad_id)
                pix = collate_images([r.features for r in chunk])
                hf.model(input_ids=ids, attention_mask=attn, **pix)

    hf_bare()
    t_bare, t_dump = _timed(hf_bare), _timed(lambda: dump_path(hf, 32))
    print(f"  hf    bare forward {n_tokens / t_bare:9.0f}   dump k=32 {n_tokens / t_dump:9.0f}   "
          f"dump/bare {t_bare / t_dump:.2f}")
    if not args.skip_vllm:
        from vllm import SamplingParams

        vb = VLLMBackend(teacher, max_model_len=512)
        prompts = [{"prompt_token_ids": r.prompt_ids, "multi_modal_data": {"image": r.image}} for r in requests]
        bare = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        vb.llm.generate(prompts, bare, use_tqdm=False)
        dump_path(vb, 32)
        t_bare = _timed(lambda: vb.llm.generate(prompts, bare, use_tqdm=False))
        t_dump = _timed(lambda: dump_path(vb, 32))
        print(f"  vllm  bare forward {n_tokens / t_bare:9.0f}   dump k=32 {n_tokens / t_dump:9.0f}   "
              f"dump/bare {t_bare / t_dump:.2f}")

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
            ids = torch.tensor([r.ids])
            pix = collate_images([r.features])
            logits = hf.model(input_ids=ids, **pix).logits[0]
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
