"""Off-policy mimic vs on-policy rounds (`lmod onpolicy`) on the demo's world, side by side: the
same starting student, the same number of student steps, about the same number of teacher-scored
samples.

  python pipelines/benchmarks/bench_onpolicy.py --demo runs/demo   # after `lmod demo --out runs/demo`

Off-policy: the teacher's dump of the first --prompts training records (their dataset answers), then
--steps of mimic distillation. On-policy: --rounds rounds on the first --prompts / --rounds records,
each round's samples drawn from the current student and scored by the teacher, --steps / --rounds
steps per round. Both start from --start (default: the demo's SFT student). Prints held-out accuracy,
hallucination, POPE F1 (the demo's evaluation questions) and the KL to the teacher and agreement with
its next token (the demo's held-out teacher dump), with the tokens the teacher scored for each.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _first(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(line + "\n" for line in src.read_text().splitlines()[:n]))
    return dst


def _evaluate(model: Path, demo: Path) -> dict:
    from shared.evaluation import evaluate_model
    from student_train.evaluate import held_out_agreement

    m = evaluate_model(model, demo / "eval_world" / "eval.jsonl")
    held = held_out_agreement(model, [demo / "eval_shards"], None)
    return {"accuracy": m["accuracy"], "hallucination": m.get("hallucination_rate", float("nan")),
            "pope_f1": m.get("pope", {}).get("f1", float("nan")), **held}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", type=Path, required=True, help="a finished `lmod demo --out` directory")
    ap.add_argument("--start", type=Path, default=None, help="starting student (default: DEMO/sft)")
    ap.add_argument("--prompts", type=int, default=900)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--backend", default="vllm", help="the teacher's dumps: vllm | hf")
    ap.add_argument("--divergences", nargs="+", default=["forward", "reverse"],
                    help="kd_divergence of the on-policy arms (one arm each)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from pipelines.onpolicy import OnPolicyConfig, run_onpolicy
    from shared.shards import dump_info
    from student_train.config import TrainConfig
    from student_train.train import train
    from teacher_dump.run import DumpConfig, dump_teacher

    demo = args.demo.resolve()
    start = (args.start or demo / "sft").resolve()
    out = args.out or Path(tempfile.mkdtemp(prefix="lmod-bench-onpolicy-"))
    out.mkdir(parents=True, exist_ok=True)
    world = demo / "world"
    cfg = TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / "mimic.yaml", steps=args.steps)
    rows = [("start", 0, 0, _evaluate(start, demo), 0.0)]

    clock = time.time()
    every = _first(world / "mimic.jsonl", out / "prompts.jsonl", args.prompts)
    dump = out / "offpolicy-dump"
    dump_teacher(DumpConfig(model=demo / "teacher", out=dump, mimic_data=every, image_root=world, shards=1,
                            top_k=32, backend=args.backend, max_model_len=512, progress=False))
    if not (out / "offpolicy" / "model.safetensors").is_file():  # a rerun of the benchmark keeps it
        train([dump], start, out / "offpolicy", cfg, image_root=world, progress=False)
    info = dump_info(dump)["mimic"]
    rows.append(("off-policy mimic", info["rows"], info["tokens"], _evaluate(out / "offpolicy", demo),
                 time.time() - clock))

    every_round = args.prompts // args.rounds
    arms = [("same", _first(world / "mimic.jsonl", out / "round-prompts.jsonl", every_round), None),
            ("fresh", every, every_round)]  # the same prompts each round / the next ones each round
    sampled = {}
    for (prompts, data, per_round), divergence in [(a, d) for a in arms for d in args.divergences]:
        clock = time.time()
        name = f"onpolicy-{divergence}-{prompts}"
        rounds = run_onpolicy(OnPolicyConfig(
            teacher=demo / "teacher", student=start, data=data, out=out / name, prompts_per_round=per_round,
            rounds=args.rounds, image_root=world, backend=args.backend, max_new_tokens=args.max_new_tokens, top_k=32,
            train=TrainConfig.from_yaml(Path(__file__).parents[1] / "configs" / "mimic.yaml",
                                        steps=args.steps // args.rounds, kd_divergence=divergence),
            progress=False))
        final = out / name / f"round-{args.rounds}" / "student"
        rows.append((f"{divergence}, {prompts} prompts", sum(r["teacher_scored_rows"] for r in rounds),
                     sum(r["teacher_scored_tokens"] for r in rounds), _evaluate(final, demo), time.time() - clock))
        sampled[name] = sum(r["generated_tokens"] for r in rounds)

    print(f"\nfrom {start.name}; {args.steps} student steps each; the teacher scored the samples below "
          f"(on-policy: of its tokens, {sampled} were the student's own; the rest earlier turns as given)")
    print(f"{'':>30} {'samples':>8} {'tokens':>7} {'acc.':>6} {'halluc.':>8} {'POPE F1':>8} {'KL->T':>7} "
          f"{'agree':>6} {'min':>5}")
    for name, samples, tokens, m, seconds in rows:
        print(f"{name:>30} {samples:>8} {tokens:>7} {m['accuracy']:>6.3f} {m['hallucination']:>8.3f} "
              f"{m['pope_f1']:>8.3f} {m['kl_to_teacher']:>7.3f} {m['agreement_with_teacher']:>6.3f} "
              f"{seconds / 60:>5.1f}")
    (out / "bench_onpolicy.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()},
         "rows": [dict(name=n, samples=s, tokens=t, **m, seconds=sec) for n, s, t, m, sec in rows]}, indent=1))


if __name__ == "__main__":
    main()
