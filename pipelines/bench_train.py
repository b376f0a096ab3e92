"""Student-training benchmark, measured side by side in one run on the tiny student:

  1. training tokens/s with mimic KD from shards vs. the same student with CE only (KD overhead);
  2. data-loader throughput (shard rows -> model inputs) vs. what the trainer consumes;
  3. the MoE student vs. a dense student of the same active parameters.

    python pipelines/bench_train.py --shards DIR --image-root WORLD --teacher TEACHER [--steps 60]

Use the demo's outputs: --shards runs/demo/shards --image-root runs/demo/world --teacher runs/demo/teacher.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _tokens_per_s(history: list[dict], skip: int = 5) -> float:
    rows = history[skip:]
    tokens = sum(r.get("tokens", 0.0) for r in rows)
    elapsed = rows[-1]["elapsed_s"] - history[skip - 1]["elapsed_s"]
    return tokens / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--image-root", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()

    from shared.mllm import batch_inputs, load_encoder
    from student_train.data import check_shards, encode_mimic, label_positions, load_mimic
    from student_train.moe import StudentConfig, active_parameters, make_dense_student, upcycle
    from student_train.train import TrainConfig, _batch_indices, train

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-train-"))
    make_dense_student(args.teacher, tmp / "dense")
    upcycle(tmp / "dense", tmp / "moe")
    # A dense student with the MoE's active parameters per token: MoE on every other layer with
    # top-2 doubles the active FFN there, so the dense FFN is 1.5x as wide in every layer.
    base = StudentConfig()
    make_dense_student(args.teacher, tmp / "dense_wide",
                       StudentConfig(text_intermediate=base.text_intermediate * 3 // 2))
    common = {"steps": args.steps, "batch_size": args.batch_size, "log_every": 10**9, "warmup": 5}

    def run(name: str, student: Path, **kw) -> list[dict]:
        return train([args.shards], student, tmp / name, TrainConfig(stage="mimic", **common, **kw),
                     image_root=args.image_root, progress=False)

    kd = run("kd", tmp / "moe", kd_weight=1.0, ce_weight=0.0)
    ce = run("ce", tmp / "moe", kd_weight=0.0, ce_weight=1.0)
    dense = run("dense", tmp / "dense_wide", kd_weight=1.0, ce_weight=0.0)
    print(f"1. training tokens/s, MoE student, batch {args.batch_size}, {args.steps} steps (first 5 skipped)")
    print(f"   mimic KD (top-k + rest) {_tokens_per_s(kd):8.0f}   CE only {_tokens_per_s(ce):8.0f}   "
          f"KD/CE {_tokens_per_s(kd) / _tokens_per_s(ce):.2f}")

    enc = load_encoder(tmp / "moe")
    files = check_shards([args.shards], "mimic", enc)
    t = time.perf_counter()
    examples = load_mimic(files, args.image_root)
    t_load = time.perf_counter() - t
    n_batches = 50
    t = time.perf_counter()
    tokens = 0
    for step in range(n_batches):
        batch = [encode_mimic(enc, examples[i]) for i in _batch_indices(step, len(examples), args.batch_size, 0)]
        batch_inputs(enc, [e.ids for e in batch], [e.image for e in batch])
        tokens += sum(len(label_positions(e)) for e in batch)
    collate = tokens / (time.perf_counter() - t)
    print("2. data loading")
    print(f"   shards -> examples: {len(examples)} rows in {t_load:.1f} s ({len(examples) / t_load:.0f} rows/s)")
    print(f"   batches (template + images + collate): {collate:8.0f} tokens/s vs trainer {_tokens_per_s(kd):8.0f} "
          f"tokens/s: loader/trainer {collate / _tokens_per_s(kd):.1f}x")

    from transformers import AutoModelForImageTextToText

    moe_model = AutoModelForImageTextToText.from_pretrained(str(tmp / "moe"))
    dense_model = AutoModelForImageTextToText.from_pretrained(str(tmp / "dense_wide"))
    print("3. MoE (4 experts, top-2) vs dense of the same active parameters")
    for name, model, hist in (("moe", moe_model, kd), ("dense", dense_model, dense)):
        total = sum(p.numel() for p in model.parameters())
        kl = sum(r["kl"] for r in hist[-10:]) / 10
        print(f"   {name:<6} active {active_parameters(model):>9}  total {total:>9}  "
              f"tokens/s {_tokens_per_s(hist):8.0f}  KL(last 10 steps) {kl:.4f}")


if __name__ == "__main__":
    main()
