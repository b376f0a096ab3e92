"""Teacher-dump benchmark: measured side by side in one run, on this machine.

  1. response tokens/s of the whole worker (`TeacherWorker.run_shard`: read, validate, encode,
     score, build rows, write zstd Parquet), in turn and pipelined (the GPU default), vs.
     the same engine's bare prefill on the same inputs, for vllm and hf, on the tiny teacher and
     on an image-heavy SmolVLM-style teacher (image tokens ~10x the response tokens, output
     projection ~8% of a position's FLOPs, as a 7B Qwen2-VL's), with vLLM's fallback path;
  2. per k = 8, 32, 64 and per encoding (f32 = format version 1, u16, u8; shared/codec.py), side
     by side: bytes per response token on disk and KL(full teacher distribution || stored top-k +
     rest, the rest spread evenly over the other tokens), on the tiny teacher;
  3. the same on a synthetic teacher with a real-size vocabulary (151,936, Qwen's): most of each
     position's mass on a few contextual tokens, the rest on Zipf frequencies over ids (ids ranked
     by frequency, as BPE vocabularies roughly are) with per-position noise (`_synthetic_logprobs`).

    python pipelines/benchmarks/bench_dump.py [--teacher DIR] [--n 256] [--skip-vllm] [--skip-throughput | --skip-size]

Without --teacher a tiny teacher is trained briefly on a fresh world (a random-init teacher has
an almost flat distribution, which would flatter nothing and tell nothing about top-k loss).
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, repeat: int = 3) -> float:
    return _timed_cpu(fn, repeat)[0]


def _timed_cpu(fn, repeat: int = 3) -> tuple[float, float]:
    """Best wall time of `repeat` runs, and this process's CPU seconds (every thread) in that run."""
    import os

    best = (float("inf"), 0.0)
    for _ in range(repeat):
        c, t = os.times(), time.perf_counter()
        fn()
        wall, c1 = time.perf_counter() - t, os.times()
        best = min(best, (wall, c1.user - c.user + c1.system - c.system))
    return best


def _requests(encoder, records: list) -> list:
    """One scoring request per record (top-32), images processed once each, as the worker does."""
    from teacher_dump.worker import prepare, score_request

    out = []
    for r in records:
        item = prepare(encoder, r)
        out.append(score_request(item.sequences[0], item.images, 32))
    return out


def head_share(model_dir: Path) -> float:
    """The output projection's share of one position's weight-matrix FLOPs (attention scores,
    which grow with the context, left out), from the text model's config."""
    import json

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    h, layers, vocab = text["hidden_size"], text["num_hidden_layers"], text["vocab_size"]
    inter = text.get("intermediate_size", text.get("ffn_dim"))
    heads = text["num_attention_heads"]
    kv = text.get("num_key_value_heads", heads) * (h // heads)
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q, o; k, v; gated MLP
    return vocab * h / (body + vocab * h)


# Qwen2-VL-7B's language model (hidden 3,584, 28 layers, 4 KV heads of 128, MLP 18,944, vocab
# 152,064): the head is 7.7% of a position's matmul FLOPs by the formula above.
QWEN2_VL_7B_HEAD_SHARE = 152_064 * 3584 / (28 * (2 * 3584**2 + 2 * 3584 * 512 + 3 * 3584 * 18_944) + 152_064 * 3584)


def _throughput(label: str, teacher: Path, world: Path, skip_vllm: bool) -> None:
    """The whole worker (read, validate, encode, score, rows, zstd Parquet) vs. the same engine's
    bare prefill on the same inputs, for both backends on one teacher; the worker with and without
    its pipeline (steps in turn, or overlapped: the GPU default); where vLLM's prompt-logprob cost goes."""
    from shared.mllm import batch_inputs, load_encoder
    from teacher_dump.inputs import plan_slices, read_records
    from teacher_dump.worker import ShardTask, TeacherWorker

    path = world / "mimic.jsonl"
    records, _ = read_records(path, "mimic", None)
    (rows,) = plan_slices(path, "mimic", 1, len(records))
    task = ShardTask("mimic", 0, "mimic/bench.parquet", rows, str(world))
    out = tempfile.mkdtemp(prefix="lmod-bench-shards-")
    encoder = load_encoder(teacher)
    requests = _requests(encoder, records)
    n_tokens = sum(len(r.positions) for r in requests)
    n_positions = sum(len(r.ids) - 1 for r in requests)
    n_image = sum(len(f.ids) for r in requests for f in r.features)
    print(f"\n{label}: {len(records)} records, {n_tokens} response tokens, {n_image} image tokens "
          f"({n_image / n_tokens:.1f}x the response), {n_positions} positions; output projection "
          f"{head_share(teacher):.1%} of a position's matmul FLOPs (Qwen2-VL-7B: {QWEN2_VL_7B_HEAD_SHARE:.1%})")

    host_ms: dict[str, float] = {}  # this process's CPU per record, dump and bare

    def dump(worker: TeacherWorker, pipelined: bool = True) -> float:
        worker.pipelined = pipelined
        wall, cpu = _timed_cpu(lambda: worker.run_shard(task, 512))
        host_ms[f"{worker.backend.name} {pipelined}"] = 1000 * cpu / len(records)
        return wall

    def line(name: str, t_bare: float, t_piped: float, t_seq: float, note: str = "") -> None:
        print(f"  {name:5} bare prefill {n_tokens / t_bare:7.0f}  whole dump {n_tokens / t_seq:7.0f} response tokens/s"
              f"  dump/bare {t_bare / t_seq:.2f} (pipelined: {t_bare / t_piped:.2f}){note}")

    hf = TeacherWorker(str(teacher), "hf", {"dtype": "float32"}, 32, out)

    def hf_bare() -> None:  # the model on already processed inputs: no image processor, no head
        with torch.no_grad():
            for s in range(0, len(requests), hf.backend.batch_size):
                chunk = requests[s : s + hf.backend.batch_size]
                hf.backend.body(hf.backend.model,
                                batch_inputs(encoder, [r.ids for r in chunk], [r.features for r in chunk]))

    hf_bare()
    dump(hf)
    t_bare = _timed(hf_bare)
    line("hf", t_bare, dump(hf), dump(hf, pipelined=False))
    hf = None  # type: ignore[assignment]  # its model is freed before the engines start
    gc.collect()
    if skip_vllm:
        return

    from vllm import SamplingParams

    from teacher_dump.backends import VLLMBackend

    prompts = [VLLMBackend._prompt(r) for r in requests]  # text-only records carry no image
    logprobs = TeacherWorker(str(teacher), "vllm", {"max_model_len": 512, "vllm_scoring": "logprobs"}, 32, out)

    def run(**kw) -> float:
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **kw)
        wall, cpu = _timed_cpu(lambda: logprobs.backend.llm.generate(prompts, params, use_tqdm=False))
        host_ms.setdefault("bare", 1000 * cpu / len(records))
        return wall

    run()
    dump(logprobs)
    t_bare, t_top = run(), run(prompt_logprobs=32, flat_logprobs=True)
    line("vllm", t_bare, dump(logprobs), dump(logprobs, pipelined=False), "  --vllm-scoring logprobs (fallback)")
    thrown = 1 - n_tokens / n_positions
    print(f"        prompt log-probs cost {t_top - t_bare:.2f} s over the bare {t_bare:.2f} s; {thrown:.0%} of the "
          "positions they cover are prompt or image positions that are thrown away")
    logprobs = None  # type: ignore[assignment]  # its engine process ends before the next one starts
    gc.collect()
    hidden = TeacherWorker(str(teacher), "vllm", {"max_model_len": 512, "vllm_scoring": "hidden"}, 32, out)
    dump(hidden)
    backend = hidden.backend
    t_all = _timed(lambda: backend.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False))
    t_engine = _timed(lambda: backend.score(requests))  # engine + head, inputs already encoded
    line("vllm", t_bare, dump(hidden), dump(hidden, pipelined=False),
         "  --vllm-scoring hidden (default; bare: the generate engine above)")
    print(f"        the engine's part of it (prefill, the scored positions' states, the head; records already "
          f"encoded): {n_tokens / t_engine:7.0f} response tokens/s, {t_bare / t_engine:.2f} of the bare prefill; "
          f"returning every position's state instead: {t_bare / t_all:.2f}")
    print(f"        CPU per record of this process (vLLM's engine core runs in it): bare {host_ms['bare']:.2f} ms, "
          f"dump {host_ms['vllm False']:.2f} ms: lmod's own work {host_ms['vllm False'] - host_ms['bare']:.2f} ms")
    hidden = backend = None  # type: ignore[assignment]  # the engine process ends here
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--n", type=int, default=256, help="mimic records")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true", help="only the size / KL tables")
    ap.add_argument("--skip-size", action="store_true", help="only the throughput table")
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
        print("1. throughput (best of 3, after warm-up), side by side")
        _throughput(f"tiny teacher {teacher}", teacher, tmp / "world", args.skip_vllm)
        # Real MLLMs spend most positions on the image: a SmolVLM-style stand-in with image splitting
        # (5 crops of 16 tokens for the world's images) gives prompts of ~10x more image than response,
        # and an MLP wide enough that its head's share of the FLOPs is a 7B Qwen2-VL's (~8%).
        heavy = build_tiny_family("smolvlm", tmp / "smolvlm_heavy", family_tokenizer(tmp / "tok"),
                                  image_tokens_per_crop=16, intermediate=576)
        _throughput("image-heavy SmolVLM-style teacher (random init)", heavy, tmp / "world", args.skip_vllm)
    if args.skip_size:
        return

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
