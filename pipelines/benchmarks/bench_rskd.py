"""Sampled distillation (RS-KD) vs top-k at equal storage, side by side in one run: the same teacher,
data, student and training budget; bytes per response token of each dump and the held-out
KL(teacher || student) after training (measured against an exact f32 top-32 dump of held-out data).

    python pipelines/benchmarks/bench_rskd.py --teacher runs/demo/teacher [--n 800] [--steps 300] [--draws 50]

The top-k side gets the k whose u8 dump costs about what the sampled dump costs (both u8; the
sampled dump also keeps top-1, the schema's minimum).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--n", type=int, default=800, help="mimic records to distil on")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--draws", type=int, default=50)
    args = ap.parse_args()

    from pipelines.toy.world import make_world
    from shared.codec import read_table
    from shared.shards import dump_info, shard_paths
    from student_train.evaluate import kl_to_teacher
    from student_train.moe import make_dense_student, upcycle
    from student_train.train import TrainConfig, train
    from teacher_dump.run import DumpConfig, dump_teacher

    tmp = Path(tempfile.mkdtemp(prefix="lmod-bench-rskd-"))
    make_world(tmp / "world", seed=5, n_mimic=args.n, n_pref=0, n_eval=0)
    make_world(tmp / "held", seed=6, n_mimic=200, n_pref=0, n_eval=0)

    def run_dump(out: Path, world: Path, **kw) -> Path:
        dump_teacher(DumpConfig(model=args.teacher, out=out, mimic_data=world / "mimic.jsonl", shards=2, backend="hf",
                                progress=False, **kw))
        return out

    held = run_dump(tmp / "held_exact", tmp / "held", top_k=32, encoding="f32")
    sampled = run_dump(tmp / "sampled", tmp / "world", top_k=1, sample=args.draws)
    per_token = dump_info(sampled)["mimic"]["bytes_per_token"]
    rows = [r for p in shard_paths(sampled, "mimic") for r in read_table(p).to_pylist()]
    unique = sum(len(i) for r in rows for i in r["sampled_ids"]) / sum(len(r["sampled_ids"]) for r in rows)
    sizes = {}
    for k in (2, 4, 8, 12, 16, 24):  # the k of equal storage
        sizes[k] = dump_info(run_dump(tmp / f"top{k}", tmp / "world", top_k=k))["mimic"]["bytes_per_token"]
        if sizes[k] >= per_token:
            break
    k = min(sizes, key=lambda c: abs(sizes[c] - per_token))

    make_dense_student(args.teacher, tmp / "dense")
    upcycle(tmp / "dense", tmp / "moe")
    before = kl_to_teacher(tmp / "moe", [held], tmp / "held")
    common = {"stage": "mimic", "steps": args.steps, "batch_size": 16, "lr": 1e-3, "warmup": 20, "log_every": 10**9}
    train([sampled], tmp / "moe", tmp / "s_rs", TrainConfig(kd="sampled", **common), image_root=tmp / "world",
          progress=False)
    train([tmp / f"top{k}"], tmp / "moe", tmp / "s_topk", TrainConfig(kd_tail="rest", **common),
          image_root=tmp / "world", progress=False)
    after = {name: kl_to_teacher(tmp / name, [held], tmp / "held") for name in ("s_rs", "s_topk")}
    print(f"RS-KD vs top-k at equal storage ({args.n} conversations, {args.steps} steps of 16, same student)")
    print(f"  sampled: {args.draws} draws/position -> {unique:.1f} unique ids/position, {per_token:.1f} B/token (u8)")
    print(f"  top-k sizes (u8, B/token): {', '.join(f'k={c}: {b:.1f}' for c, b in sizes.items())}; "
          f"compared with k={k}")
    print(f"  held-out KL(teacher || student), nats/token: untrained {before:.4f}")
    print(f"    sampled (RS-KD)        {after['s_rs']:.4f}")
    print(f"    top-{k} + rest bucket   {after['s_topk']:.4f}")
    print(f"    sampled / top-k: {after['s_rs'] / after['s_topk']:.2f}")


if __name__ == "__main__":
    main()
