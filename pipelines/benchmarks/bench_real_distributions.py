"""The figures that depend on the shape of a teacher's distribution, on a real one: SmolLM2-135M-
Instruct (vocabulary 49,152) answering questions made from the standard library's docstrings
(greedy answers and temperature-1 samples), its full next-token distribution at every response
position. Side by side in one run:

  1. the distributions: top-1 / top-8 / top-64 mass, entropy, ids needed for 0.99 of the mass;
  2. the rate-distortion frontier: bytes per response token (per-token columns in zstd Parquet, as
     a shard stores them) against KL(full || stored top-k + rest spread evenly), for k = 8..128 in
     each encoding, and for a per-position k chosen by mass (keep ids until they hold P of the
     probability, capped at k) as a candidate encoding;
  3. tail treatments as gradients: the gradient each sparse loss gives the student's logits,
     against the full-distribution KL gradient (relative error, mean over positions), for `rest`
     and `renorm` at each k (a fixed bias), and RS-KD at the same bytes (one draw set's error, and
     the error left after averaging 32 independent sets: unbiased, it falls as 1/sqrt(sets));
  4. dump / bare prefill with this model on both backends (pipelines/benchmarks/bench_dump.py's measure).

    python pipelines/benchmarks/bench_real_distributions.py [--questions 48] [--skip-throughput] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _positions(teacher: Path, answers: list[Path], limit: int) -> np.ndarray:
    """Full log-probs [N, V] (float32) at the response positions of the answer files."""
    from shared.mllm import load_encoder
    from shared.models import load_model
    from teacher_dump.inputs import read_records
    from teacher_dump.worker import prepare

    encoder = load_encoder(teacher)
    model = load_model(teacher).eval()
    out = []
    for path in answers:
        records, _ = read_records(path, "mimic", None)
        for rec in records:
            enc = prepare(encoder, rec).sequences[0]
            pos = [i for i, m in enumerate(enc.response_mask) if m]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([enc.ids])).logits[0, torch.tensor(pos) - 1]
            out.append(torch.log_softmax(logits.double(), -1).float().numpy())
    return np.concatenate(out)[:limit]


def _bytes_per_token(rows: list[dict], enc, positions: int) -> tuple[float, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.schema import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL

    schema = pa.schema([pa.field("response_ids", pa.list_(pa.int32())),
                        pa.field("target_logprobs", pa.list_(enc.target_type())),
                        pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),
                        pa.field("topk_logprobs", pa.list_(pa.list_(enc.logprob_type()))),
                        pa.field("rest_mass", pa.list_(pa.float32()))])
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression=PARQUET_COMPRESSION,
                   compression_level=PARQUET_COMPRESSION_LEVEL, use_dictionary=False, row_group_size=128)
    return buf.getvalue().size / positions, pa.Table.from_pylist(rows, schema=schema)


def _store(logp: np.ndarray, kept: list[np.ndarray], enc, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Write positions keeping the ids `kept[t]` (each its own length), rows of 32 positions; returns
    bytes per token and KL(full || decoded stored + rest spread evenly) per position."""
    from pipelines.benchmarks.bench_dump import _stored_kl

    rows = []
    for s in range(0, len(logp), 32):
        ids_col, q_col, rests, tgt = [], [], [], []
        for t in range(s, min(s + 32, len(logp))):
            ids = kept[t]
            lps = logp[t, ids].astype(np.float64)
            i, q = enc.encode_topk(ids[None], lps[None])
            ids_col.append(i[0])
            q_col.append(q[0])
            rests.append(max(0.0, 1 - float(np.exp(lps).sum())))
            tgt.append(logp[t, targets[t]])
        rows.append({"response_ids": targets[s : s + 32].astype(np.int32),
                     "target_logprobs": enc.encode_targets(np.asarray(tgt)), "topk_ids": ids_col,
                     "topk_logprobs": q_col, "rest_mass": np.asarray(rests, np.float32)})
    per_token, table = _bytes_per_token(rows, enc, len(logp))
    return per_token, _stored_kl(logp.astype(np.float64), enc.decode(table))


def _gradient_errors(logp: torch.Tensor, student: torch.Tensor, k: int) -> dict[str, float]:
    """Relative error of each sparse loss's gradient in the student's logits against the full KL's
    (softmax(z) - p), mean over positions."""
    from student_train.losses import sparse_kl

    full = torch.softmax(student, -1) - logp.exp()
    top = logp.topk(k, -1)
    rest = (1 - top.values.exp().sum(-1)).clamp_min(0)
    out = {}
    for tail in ("rest", "renorm"):
        z = student.clone().requires_grad_(True)
        sparse_kl(z, top.indices, top.values, tail, 1.0, rest if tail == "rest" else None).sum().backward()
        out[tail] = float(((z.grad - full).norm(dim=-1) / full.norm(dim=-1)).mean())
    return out


def _rskd_errors(logp: torch.Tensor, student: torch.Tensor, draws: int, repeats: int = 32) -> tuple[float, float,
                                                                                                        float]:
    """RS-KD with `draws` draws: the relative error of the mean gradient over `repeats` independent
    draw sets (what is left of the error after averaging: ~1/sqrt(repeats) of one set's if unbiased,
    as steps average it in training), of one draw set, and unique ids per position."""
    from student_train.losses import sampled_kd
    from teacher_dump.backends import sample_counts

    full = torch.softmax(student, -1) - logp.exp()
    grads, unique = [], []
    for r in range(repeats):
        ids, counts = sample_counts(logp.double(), draws, seed=r)
        width = max(len(i) for i in ids)
        id_t = torch.zeros((len(ids), width), dtype=torch.long)
        w_t = torch.zeros((len(ids), width))
        for t, (i, c) in enumerate(zip(ids, counts)):
            id_t[t, : len(i)] = torch.as_tensor(i, dtype=torch.long)
            w_t[t, : len(i)] = torch.as_tensor(c, dtype=torch.float32) / draws
        unique.append(np.mean([len(i) for i in ids]))
        z = student.clone().requires_grad_(True)
        sampled_kd(z, id_t, w_t).sum().backward()
        grads.append(z.grad)
    g = torch.stack(grads)
    norm = full.norm(dim=-1)
    bias = float(((g.mean(0) - full).norm(dim=-1) / norm).mean())
    single = float(((g - full).norm(dim=-1) / norm).mean())
    return bias, single, float(np.mean(unique))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=48, help="questions per kind of answer (greedy, sampled)")
    ap.add_argument("--positions", type=int, default=2048, help="response positions kept")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--throughput-only", action="store_true", help="only section 4")
    args = ap.parse_args()

    from pipelines.benchmarks.bench_dump import _throughput
    from pipelines.real.docstrings import TRAIN_MODULES, write_questions
    from pipelines.real.smollm2 import teacher_dir
    from shared.codec import ENCODINGS, Encoding
    from teacher_dump.backends import Sampling
    from teacher_dump.generate import GenerateConfig, generate

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-real-dist-"))
    teacher = teacher_dir()
    questions = write_questions(tmp / "questions.jsonl", TRAIN_MODULES, args.questions)
    answers = []
    for name, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        answers.append(tmp / name / "mimic.jsonl")
        answers[-1].parent.mkdir()
        generate(GenerateConfig(model=teacher, data=questions, out=answers[-1], backend="hf",
                                sampling=Sampling(temperature, 1.0, 48), batch_size=16, max_model_len=512))
    if args.throughput_only:
        _throughput("SmolLM2-135M-Instruct on its greedy answers", teacher, answers[0].parent, args.skip_vllm)
        return
    logp = _positions(teacher, answers, args.positions)
    n, vocab = logp.shape
    p_sorted = -np.sort(-np.exp(logp.astype(np.float64)), axis=-1)
    cum = np.cumsum(p_sorted, -1)
    entropy = -(np.exp(logp.astype(np.float64)) * logp).sum(-1)
    need99 = (cum < 0.99).sum(-1) + 1
    print(f"1. SmolLM2-135M-Instruct, {n} response positions (greedy answers and temperature-1 samples to "
          f"{args.questions} docstring questions each), vocabulary {vocab}")
    print(f"   mass in top-1 {cum[:, 0].mean():.3f}, top-8 {cum[:, 7].mean():.3f}, top-64 {cum[:, 63].mean():.3f} "
          f"(10th percentile {np.percentile(cum[:, 63], 10):.3f}, min {cum[:, 63].min():.3f}); entropy "
          f"{entropy.mean():.2f} nats; ids for 0.99 of the mass: median {int(np.median(need99))}, "
          f"90th percentile {int(np.percentile(need99, 90))}")

    targets = logp.argmax(-1)  # a stand-in label (the row's own token is stored beside, the same size)
    order = np.argsort(-logp, axis=-1)[:, :128]
    print("\n2. bytes per response token (per-token columns, zstd Parquet) against KL(full || stored), nats per token")
    print(f"   {'kept':>26} {'encoding':>8} {'B/token':>8} {'KL mean':>9} {'KL p90':>9}")
    frontier = []
    for k in (8, 16, 32, 64, 128):
        for name in ENCODINGS:
            per_token, kl = _store(logp, [order[t, :k] for t in range(n)], Encoding(name), targets)
            frontier.append((per_token, kl.mean(), f"top-{k}", name))
            print(f"   {'top-' + str(k):>26} {name:>8} {per_token:>8.1f} {kl.mean():>9.2e} "
                  f"{np.percentile(kl, 90):>9.2e}")
    for share in (0.9, 0.95, 0.99):
        for cap in (32, 64, 128):
            kept = [order[t, : min(cap, int((cum[t] < share).sum()) + 1)] for t in range(n)]
            per_token, kl = _store(logp, kept, Encoding("u8"), targets)
            label = f"mass {share} (cap {cap}, mean {np.mean([len(x) for x in kept]):.1f} ids)"
            frontier.append((per_token, kl.mean(), label, "u8"))
            print(f"   {label:>26} {'u8':>8} {per_token:>8.1f} {kl.mean():>9.2e} {np.percentile(kl, 90):>9.2e}")
    best = []
    for point in sorted(frontier):
        if not best or point[1] < best[-1][1]:
            best.append(point)
    print("   frontier (no other point is both smaller and closer): "
          + "; ".join(f"{label} {name} {b:.0f} B {kl:.1e}" for b, kl, label, name in best))

    print("\n3. gradient in the student's logits against the full KL gradient (mean relative error); students: "
          "the teacher's logits plus Gaussian noise of sd 1, and the teacher at temperature 2")
    lp = torch.from_numpy(logp[:512]).double()
    logits = lp.clone()
    students = {"noise sd 1": logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)),
                "temperature 2": logits / 2}
    for label, student in students.items():
        for k in (8, 32, 64, 128):
            errors = _gradient_errors(lp, student, k)
            print(f"   {label:>13} top-{k:<3}: rest {errors['rest']:.3f}, renorm {errors['renorm']:.3f}")
        for draws in (16, 64, 256):
            bias, single, unique = _rskd_errors(lp, student, draws)
            print(f"   {label:>13} RS-KD {draws:>3} draws ({unique:.1f} unique ids, ~top-{round(unique)}'s bytes): "
                  f"one draw set {single:.3f}, mean of 32 sets {bias:.3f} (1/sqrt(32) of one: {single / 32**0.5:.3f})")

    del logp, lp, p_sorted, cum  # the engines below need the memory (vLLM reserves its KV cache up front)
    gc.collect()
    if not args.skip_throughput:
        print("\n4. throughput, dump vs bare prefill (best of 3, after warm-up)")
        _throughput("SmolLM2-135M-Instruct on its greedy answers", teacher, answers[0].parent, args.skip_vllm)


if __name__ == "__main__":
    main()
