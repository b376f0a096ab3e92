"""Student-training benchmark, measured side by side in one run on the tiny student:

  1. training tokens/s with mimic KD from shards vs. the same student with CE only (KD overhead);
  2. data-loader throughput (shard rows -> collated model inputs, in DataLoader workers) vs. what
     the trainer consumes;
  3. the MoE student vs. a dense student of the same active parameters;
  4. (--scale) peak RSS of training on 1x and 16x the rows (the same steps): streaming keeps it flat.

    python pipelines/benchmarks/bench_train.py --shards DIR --image-root WORLD --teacher TEACHER [--steps 60] [--scale]

Use the demo's outputs: --shards runs/demo/shards --image-root runs/demo/world --teacher runs/demo/teacher.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tokens_per_s(history: list[dict], skip: int = 5) -> float:
    rows = history[skip:]
    tokens = sum(r.get("tokens", 0.0) for r in rows)
    elapsed = rows[-1]["elapsed_s"] - history[skip - 1]["elapsed_s"]
    return tokens / elapsed


def replicate_dump(src: Path, dst: Path, rows: int, times: int, rows_per_shard: int = 4000) -> int:
    """A dump of the first `rows` mimic rows of `src`, repeated `times` times (ids made unique),
    with a manifest as the teacher would write it. Returns the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shared.manifest import Manifest
    from shared.schema import FORMAT_VERSION, shard_name
    from shared.shards import shard_paths
    from teacher_dump.shard_writer import write_shard

    base = pa.concat_tables([pq.read_table(p) for p in shard_paths(src, "mimic")]).slice(0, rows)
    total = base.num_rows * times
    n_shards = -(-total // rows_per_shard)
    manifest = Manifest.load(src)
    manifest.shards, manifest.format_version = {}, FORMAT_VERSION  # written as f32 rows of this version
    manifest.run = {**manifest.run, "plan": {**manifest.run.get("plan", {}), "shards": {"mimic": n_shards}}}
    dst.mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        lo, hi = i * rows_per_shard, min(total, (i + 1) * rows_per_shard)
        records = []
        for r in range(lo, hi):
            rec = base.slice(r % base.num_rows, 1).to_pylist()[0]
            records.append({"sampled_ids": [], "sampled_counts": [], **rec,
                            "sample_id": f"{rec['sample_id']}#{r // base.num_rows}"})
        tokens = sum(len(r["response_ids"]) for r in records)
        rel = shard_name("mimic", i, n_shards)
        manifest.shards[rel] = write_shard(dst, rel, "mimic", i, records, tokens, [lo, hi])
    manifest.save(dst)
    return total


def _peak_rss_child(shards: str, student: str, image_root: str, out: str, steps: int, batch: int) -> None:
    import resource

    from student_train.train import TrainConfig, train

    cfg = TrainConfig(stage="mimic", steps=steps, batch_size=batch, warmup=2, log_every=10**9)
    train([Path(shards)], Path(student), Path(out), cfg, image_root=Path(image_root), progress=False)
    print(json.dumps({"trainer_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--image-root", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--scale", action="store_true", help="also measure peak RSS at 1x and 16x the rows")
    ap.add_argument("--scale-rows", type=int, default=2000)
    ap.add_argument("--skip-speed", action="store_true", help="only part 4 (with --scale)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _peak_rss_child(str(args.shards), args.child[0], str(args.image_root), args.child[1], int(args.child[2]),
                        int(args.child[3]))
        return

    from shared.mllm import load_encoder
    from student_train.data import MicroBatches, check_shards, loader
    from student_train.moe import StudentConfig, active_parameters, make_dense_student, upcycle
    from student_train.train import TrainConfig, train

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-train-"))
    make_dense_student(args.teacher, tmp / "dense")
    upcycle(tmp / "dense", tmp / "moe")
    # A dense student with the MoE's active parameters per token: MoE on every other layer with
    # top-2 doubles the active FFN there, so the dense FFN is 1.5x as wide in every layer.
    base = StudentConfig()
    make_dense_student(args.teacher, tmp / "dense_wide",
                       StudentConfig(text_intermediate=base.text_intermediate * 3 // 2))
    if args.skip_speed:
        _scale(args, tmp)
        return
    # the whole language model trains in every run: a dense student has no experts to train alone
    common = {"steps": args.steps, "batch_size": args.batch_size, "log_every": 10**9, "warmup": 5,
              "train": ["language"]}

    def run(name: str, student: Path, **kw) -> list[dict]:
        return train([args.shards], student, tmp / name, TrainConfig(stage="mimic", **common, **kw),
                     image_root=args.image_root, progress=False)

    kd = run("kd", tmp / "moe", kd_weight=1.0, ce_weight=0.0)
    ce = run("ce", tmp / "moe", kd_weight=0.0, ce_weight=1.0)
    dense = run("dense_run", tmp / "dense_wide", kd_weight=1.0, ce_weight=0.0)
    trainer = _tokens_per_s(kd)
    print(f"1. training tokens/s, MoE student, batch {args.batch_size}, {args.steps} steps (first 5 skipped)")
    print(f"   mimic KD (top-k + rest) {trainer:8.0f}   CE only {_tokens_per_s(ce):8.0f}   "
          f"KD/CE {trainer / _tokens_per_s(ce):.2f}")

    files = check_shards([args.shards], "mimic", load_encoder(tmp / "moe"))
    data = MicroBatches("mimic", files, tmp / "moe", args.image_root, args.batch_size)
    print(f"2. data loading ({data.index.rows} rows in {len(data.index.groups)} row groups), "
          f"{args.batch_size} rows per batch, 60 batches")
    for workers in (0, 1, 2):
        batches = loader(data, 0, 60, workers=workers)
        t = time.perf_counter()
        tokens = sum(b.tokens for b in batches)
        rate = tokens / (time.perf_counter() - t)
        print(f"   {workers} worker(s): {rate:8.0f} tokens/s (start-up included) vs trainer {trainer:8.0f}: "
              f"loader/trainer {rate / trainer:.1f}x")

    from transformers import AutoModelForImageTextToText

    moe_model = AutoModelForImageTextToText.from_pretrained(str(tmp / "moe"))
    dense_model = AutoModelForImageTextToText.from_pretrained(str(tmp / "dense_wide"))
    print("3. MoE (4 experts, top-2) vs dense of the same active parameters")
    for name, model, hist in (("moe", moe_model, kd), ("dense", dense_model, dense)):
        total = sum(p.numel() for p in model.parameters())
        kl = sum(r["kl"] for r in hist[-10:]) / 10
        print(f"   {name:<6} active {active_parameters(model):>9}  total {total:>9}  "
              f"tokens/s {_tokens_per_s(hist):8.0f}  KL(last 10 steps) {kl:.4f}")

    if args.scale:
        _scale(args, tmp)


def _scale(args: argparse.Namespace, tmp: Path) -> None:
    """Part 4: the same training on 1x and 16x the rows, each in a fresh process; peak RSS of both."""
    print(f"4. peak RSS, {args.steps} training steps, loader workers 2, on 1x and 16x rows")
    results = {}
    for times in (1, 16):
        dump = tmp / f"scaled-{times}x"
        n = replicate_dump(args.shards, dump, args.scale_rows, times)
        cmd = [sys.executable, __file__, "--shards", str(dump), "--image-root", str(args.image_root),
               "--teacher", str(args.teacher), "--child", str(tmp / "moe"), str(tmp / f"rss-{times}x"),
               str(args.steps), str(args.batch_size)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[times] = json.loads(res.stdout.strip().splitlines()[-1])
        size = sum(p.stat().st_size for p in dump.rglob("*.parquet")) / 2**20
        got = results[times]
        print(f"   {times:>2}x: {n:>7} rows, {size:7.1f} MB of shards: trainer peak {got['trainer_mb']:7.0f} MB, "
              f"largest loader worker {got['worker_mb']:7.0f} MB")
    growth = results[16]["trainer_mb"] - results[1]["trainer_mb"]
    print(f"   16x - 1x: trainer {growth:+.0f} MB, worker "
          f"{results[16]['worker_mb'] - results[1]['worker_mb']:+.0f} MB (goal: within +150 MB)")


if __name__ == "__main__":
    main()
