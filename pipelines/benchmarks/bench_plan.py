"""Teacher-input benchmark: what the `lmod dump-teacher` driver costs as the data grows, side by side
in one run, each measurement in a fresh process (peak RSS is per process):

  1. planning (row counts, JSONL line offsets, the input's sha256) with --shards 512 for 1/16 of the
     records and for all of them: wall time and the driver's peak RSS, beside the old way of
     holding every record in the driver (`read_records`, what the driver did before planning
     from row counts);
  2. validation (`--dry-run`: the validator actors read, check, encode and length-check every row)
     for --validate records: records/s on this machine and the driver's peak RSS.

The data are generated JSONL conversations (the tiny world's, ids made unique) pointing at a few
images, as the issue asks.

    python pipelines/benchmarks/bench_plan.py [--records 1000000] [--shards 512] [--validate 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_records(world: Path, out: Path, n: int) -> Path:
    """`n` JSONL records cycled from the world's conversations, each with its own id; the images
    stay the world's few files."""
    base = [json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()]
    for rec in base:
        rec["image"] = str(world / rec["image"])
    with open(out, "w") as f:
        for i in range(n):
            rec = base[i % len(base)]
            f.write(json.dumps({**rec, "id": f"r{i:08d}"}) + "\n")
    return out


_CHILD = """
import json, resource, sys, time
from pathlib import Path
from shared.mllm import load_encoder
from teacher_dump.run import DumpConfig, dump_teacher, plan_tasks
from teacher_dump.inputs import read_records
mode, teacher, data, shards, out = sys.argv[1:6]
cfg = DumpConfig(model=Path(teacher), out=Path(out), mimic_data=Path(data), shards=int(shards), backend="hf",
                 max_model_len=512, progress=False, dry_run=True)
load_encoder(teacher)  # the driver holds the teacher's processor either way
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
if mode == "plan":
    tasks, _ = plan_tasks(cfg)
    n = len(tasks)
elif mode == "hold":
    records, _ = read_records(Path(data), "mimic", None)
    n = len(records)
else:
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()):
        dump_teacher(cfg)
    n = 0
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "peak_mb": peak, "base_mb": base, "n": n}))
"""


def _measure(mode: str, teacher: Path, data: Path, shards: int, out: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, mode, str(teacher), str(data), str(shards), str(out)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{mode} on {data} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=512)
    ap.add_argument("--validate", type=int, default=20_000, help="records validated by the --dry-run measurement")
    ap.add_argument("--skip-hold", action="store_true", help="leave out the old driver's way (holding records)")
    args = ap.parse_args()

    from pipelines.toy.tiny_teacher import make_tiny_teacher
    from pipelines.toy.world import make_world

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-plan-"))
    make_world(tmp / "world", seed=7, n_mimic=48, n_pref=0, n_eval=0)
    make_tiny_teacher(tmp / "world", tmp / "teacher", steps=0)
    t = time.perf_counter()
    small = make_records(tmp / "world", tmp / "small.jsonl", args.records // 16)
    full = make_records(tmp / "world", tmp / "full.jsonl", args.records)
    print(f"generated {args.records:,} records ({full.stat().st_size / 2**20:.0f} MiB JSONL, "
          f"{len(list((tmp / 'world' / 'images').iterdir()))} images) in {time.perf_counter() - t:.1f} s")

    print(f"\n1. the driver, --shards {args.shards}: seconds and peak RSS (MB; in brackets: over the process "
          "after imports and the processor)")
    print(f"  {'records':>10} {'plan s':>7} {'plan MB':>14} {'hold records s':>15} {'hold records MB':>16}")
    rows = []
    for data, n in ((small, args.records // 16), (full, args.records)):
        plan = _measure("plan", tmp / "teacher", data, args.shards, tmp / "out")
        hold = None if args.skip_hold else _measure("hold", tmp / "teacher", data, args.shards, tmp / "out")
        rows.append((plan, hold))
        hold_s = f"{hold['seconds']:>15.1f} {hold['peak_mb']:>8.0f} [+{hold['peak_mb'] - hold['base_mb']:>5.0f}]" \
            if hold else f"{'-':>15} {'-':>16}"
        print(f"  {n:>10,} {plan['seconds']:>7.2f} {plan['peak_mb']:>6.0f} [+{plan['peak_mb'] - plan['base_mb']:>5.0f}]"
              f" {hold_s}")
    (p1, h1), (p16, h16) = rows
    print(f"  16x the records: planning peak RSS {p16['peak_mb'] - p1['peak_mb']:+.0f} MB, time "
          f"x{p16['seconds'] / p1['seconds']:.1f}" + (
              f"; holding the records {h16['peak_mb'] - h1['peak_mb']:+.0f} MB "
              f"(x{(h16['peak_mb'] - h16['base_mb']) / max(p16['peak_mb'] - p16['base_mb'], 1):.0f} "
              "the planner's growth over its base)" if h16 else ""))

    if args.validate:
        part = make_records(tmp / "world", tmp / "validate.jsonl", args.validate)
        dry = _measure("dry", tmp / "teacher", part, args.shards, tmp / "out")
        print(f"\n2. --dry-run over {args.validate:,} records ({args.shards} shards, validator actors on this "
              f"machine's CPUs): {dry['seconds']:.1f} s = {args.validate / dry['seconds']:,.0f} records/s "
              f"(Ray start and actor start included); driver peak RSS {dry['peak_mb']:.0f} MB "
              f"[+{dry['peak_mb'] - dry['base_mb']:.0f}]")


if __name__ == "__main__":
    main()
