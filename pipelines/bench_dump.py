"""Teacher-dump benchmark: measured side by side in one run, on this machine.

  1. response tokens/s of the whole dump path (encode, score, build rows, write zstd Parquet)
     vs. the same engine's bare forward pass on the same inputs, for vllm and hf, on the tiny
     teacher and on an image-heavy SmolVLM-style teacher (image tokens ~10x the response tokens),
     with the share of vLLM's time spent on log-probs of positions that are thrown away;
  2. per k = 8, 32, 64 and per encoding (f32 = format version 1, u16, u8; shared/codec.py), side
     by side: bytes per response token on disk and KL(full teacher distribution || stored top-k +
     rest, the rest spread evenly over the other tokens), on the tiny teacher;
  3. the same on a synthetic teacher with a real-size vocabulary (151,936, Qwen's): most of each
     position's mass on a few contextual tokens, the rest on Zipf frequencies over ids (ids ranked
     by frequency, as BPE vocabularies roughly are) with per-position noise (`_synthetic_logprobs`).

    python pipelines/bench_dump.py [--teacher DIR] [--n 256] [--skip-vllm] [--skip-throughput]

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
    from teacher_dump.worker import prepare, score_request

    out = []
    for r in records:
        item = prepare(encoder, r)
        out.append(score_request(item.sequences[0], item.images, 32))
    return out


def _throughput(label: str, teacher: Path, records: list, skip_vllm: bool) -> None:
    """dump/bare for both backends on one teacher, and where vLLM's prompt-logprob cost goes."""

    from shared.mllm import batch_inputs, load_encoder
    from teacher_dump.backends import HFBackend, VLLMBackend
    from teacher_dump.shard_writer import table_bytes
    from teacher_dump.worker import prepare, shard_rows

    encoder = load_encoder(teacher)
    requests = _requests(encoder, records)
    n_tokens = sum(len(r.positions) for r in requests)
    n_positions = sum(len(r.ids) - 1 for r in requests)
    n_image = sum(len(f.ids) for r in requests for f in r.features)
    print(f"\n{label}: {len(records)} records, {n_tokens} response tokens, {n_image} image tokens "
          f"({n_image / n_tokens:.1f}x the response), {n_positions} scored positions")

    def dump_path(backend) -> None:
        # as the worker does: vLLM expands the images itself, lmod counts their runs (no pixels)
        counted = backend.name != "hf"
        rows, _ = shard_rows(backend, encoder, [prepare(encoder, r, keep_tensors=not counted, count_only=counted)
                                                for r in records], 32)
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

    engine = VLLMBackend(teacher, max_model_len=512, scoring="logprobs")
    prompts = [{"prompt_token_ids": r.prompt_ids, "multi_modal_data": {"image": r.images[0]}} for r in requests]

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
          f"dump/bare {t_bare / t_dump:.2f}   (--vllm-scoring logprobs, the earlier path)")
    print(f"  vllm  prompt log-probs cost {t_top - t_bare:.2f} s over the bare {t_bare:.2f} s (target only: "
          f"{t_target - t_bare:.2f} s); vLLM scores every prompt position, {thrown:.0%} of them prompt or image "
          f"positions lmod throws away: ~{(t_top - t_bare) * thrown / t_dump:.0%} of the dump's time")
    del engine  # its engine process ends before the next one starts
    gc.collect()
    hidden = VLLMBackend(teacher, max_model_len=512, scoring="hidden")
    dump_path(hidden)
    t_hidden = _timed(partial(dump_path, hidden))
    print(f"  vllm  hidden states + head at scored positions (the default): dump k=32 {n_tokens / t_hidden:9.0f} "
          f"response tokens/s   dump/bare {t_bare / t_hidden:.2f} (bare: the generate engine above)")
    del hidden
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--n", type=int, default=256, help="mimic records")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="only the size / KL tables")
    ap.add_argument("--synthetic-positions", type=int, default=1024)
    args = ap.parse_args()

    import pyarrow as pa

    from pipelines.toy.tiny_families import build_tiny_family, family_tokenizer
    from pipelines.toy.tiny_teacher import make_tiny_teacher
    from pipelines.toy.world import make_world
    from shared.codec import ENCODINGS, Encoding
    from shared.mllm import batch_inputs, load_encoder
    from shared.schema import mimic_schema
    from teacher_dump.backends import HFBackend
    from teacher_dump.inputs import read_records
    from teacher_dump.shard_writer import table_bytes
    from teacher_dump.worker import prepare, shard_rows

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-"))
    make_world(tmp / "world", seed=7, n_mimic=args.n, n_pref=0, n_eval=0)
    teacher = args.teacher
    if teacher is None:
        teacher = tmp / "teacher"
        make_world(tmp / "train_world", seed=0, n_mimic=2000, n_pref=0, n_eval=0)
        make_tiny_teacher(tmp / "train_world", teacher, steps=args.teacher_steps)
    records, _ = read_records(tmp / "world" / "mimic.jsonl", "mimic", None)

    if not args.skip_throughput:
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
    with torch.no_grad():
        full = []
        for r in requests:
            logits = hf.model(**batch_inputs(encoder, [r.ids], [r.features])).logits[0]
            full.append(torch.log_softmax(logits[torch.tensor(r.positions) - 1].double(), -1))
        logp = torch.cat(full).numpy()  # [N, V], the rows' response positions in order

    items = [prepare(encoder, r) for r in records]
    print(f"\n2. tiny teacher (vocabulary {logp.shape[-1]}): per k and encoding, bytes per response token (whole "
          "zstd Parquet mimic rows) and KL(full || stored top-k + rest) in nats per token")
    print(f"  {'k':>3} {'encoding':>8} {'B/token':>8} {'KL mean':>9} {'KL max':>9} {'+KL vs f32':>11}")
    for k in (8, 32, 64):
        exact = None
        for name in ENCODINGS:
            enc = Encoding(name)
            rows, tokens = shard_rows(hf, encoder, items, k, enc)
            size = len(table_bytes("mimic", rows, enc))
            stored = enc.decode(pa.Table.from_pylist(rows, schema=mimic_schema(enc)))
            kl = _stored_kl(logp, stored)
            exact = kl.mean() if exact is None else exact
            print(f"  {k:>3} {name:>8} {size / tokens:>8.1f} {kl.mean():>9.2e} {kl.max():>9.2e} "
                  f"{kl.mean() - exact:>11.1e}")

    print(f"\n3. synthetic teacher, vocabulary 151,936 (see the top of this file), {args.synthetic_positions} "
          "positions: per-token columns only (ids, target, top-k, rest; a real row adds its prompt text once)")
    print(f"  {'k':>3} {'encoding':>8} {'B/token':>8} {'KL mean':>9} {'KL max':>9} {'+KL vs f32':>11}  "
          "mean top-1 p, rest")
    _synthetic(args.synthetic_positions)


def _stored_kl(logp: np.ndarray, stored) -> np.ndarray:
    """KL(full || stored top-k + rest spread evenly over the other ids), per position."""
    ids = [np.array(p) for row in stored.column("topk_ids").to_pylist() for p in row]
    lps = [np.array(p, dtype=np.float64) for row in stored.column("topk_logprobs").to_pylist() for p in row]
    rest = np.concatenate([np.array(r, dtype=np.float64) for r in stored.column("rest_mass").to_pylist()])
    vocab = logp.shape[-1]
    out = np.empty(len(ids))
    for t, (i, lp) in enumerate(zip(ids, lps)):
        q = np.full(vocab, np.log(max(rest[t], 1e-30) / (vocab - len(i))))
        q[i] = lp
        out[t] = float((np.exp(logp[t]) * (logp[t] - q)).sum())
    return out


def _synthetic_logprobs(rng: np.random.Generator, positions: int, vocab: int = 151_936) -> np.ndarray:
    """Per position: a share alpha ~ Beta(8, 1) (mean 0.89) of the mass on 1-5 contextual tokens
    (Dirichlet(0.5) weights; frequent ids or any id, half and half) and the rest on a background of
    Zipf frequencies over ids (p ~ rank^-1.8) with log-normal context noise (sigma 1)."""
    ranks = np.log(np.arange(1, vocab + 1))
    out = np.empty((positions, vocab))
    for t in range(positions):
        background = -1.8 * ranks + rng.normal(0.0, 1.0, vocab)
        background -= np.logaddexp.reduce(background)
        m = int(rng.integers(1, 6))
        context = rng.choice(vocab, m, replace=False) if rng.random() < 0.5 else rng.choice(2000, m, replace=False)
        alpha = rng.beta(8.0, 1.0)
        p = (1 - alpha) * np.exp(background)
        np.add.at(p, context, alpha * rng.dirichlet(np.full(m, 0.5)))
        out[t] = np.log(p)
    return out


def _synthetic(positions: int, chunk: int = 256) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.codec import ENCODINGS, Encoding
    from shared.schema import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL

    rng = np.random.default_rng(0)
    positions = -(-positions // chunk) * chunk  # whole rows of 32 in whole chunks
    parts = [_synthetic_logprobs(rng, min(chunk, positions - s)) for s in range(0, positions, chunk)]
    for k in (8, 32, 64):
        tops = [np.argpartition(-p, k, axis=-1)[:, :k] for p in parts]
        exact = None
        for name in ENCODINGS:
            enc = Encoding(name)
            rows, kls, top1, rests = [], [], [], []
            for p, top in zip(parts, tops):
                lps = np.take_along_axis(p, top, -1)
                order = np.argsort(-lps, axis=-1)
                top, lps = np.take_along_axis(top, order, -1), np.take_along_axis(lps, order, -1)
                rest = np.clip(1 - np.exp(lps).sum(-1), 0, 1)
                for s in range(0, len(p), 32):  # rows of 32 response tokens
                    ids, q = enc.encode_topk(top[s : s + 32], lps[s : s + 32])
                    rows.append({"response_ids": top[s : s + 32, 0].astype(np.int32),
                                 "target_logprobs": enc.encode_targets(lps[s : s + 32, 0]), "topk_ids": ids,
                                 "topk_logprobs": q, "rest_mass": rest[s : s + 32].astype(np.float32)})
                top1.append(np.exp(lps[:, 0]))
                rests.append(rest)
            schema = pa.schema([pa.field("response_ids", pa.list_(pa.int32())),
                                pa.field("target_logprobs", pa.list_(enc.target_type())),
                                pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),
                                pa.field("topk_logprobs", pa.list_(pa.list_(enc.logprob_type()))),
                                pa.field("rest_mass", pa.list_(pa.float32()))])
            table = pa.Table.from_pylist(rows, schema=schema)
            buf = pa.BufferOutputStream()
            pq.write_table(table, buf, compression=PARQUET_COMPRESSION, compression_level=PARQUET_COMPRESSION_LEVEL,
                           use_dictionary=False, row_group_size=128)
            decoded = enc.decode(table)
            start = 0
            for p in parts:
                kls.append(_stored_kl(p, decoded.slice(start // 32, len(p) // 32)))
                start += len(p)
            kl = np.concatenate(kls)
            exact = kl.mean() if exact is None else exact
            print(f"  {k:>3} {name:>8} {buf.getvalue().size / positions:>8.1f} {kl.mean():>9.2e} {kl.max():>9.2e} "
                  f"{kl.mean() - exact:>11.1e}  {np.concatenate(top1).mean():.2f}, {np.concatenate(rests).mean():.1e}")


if __name__ == "__main__":
    main()
