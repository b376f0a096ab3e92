"""The embedded-default recipe: world -> tiny teacher -> teacher dump on Ray with vLLM.

Every step is skipped when its output already exists, so an interrupted demo resumes.
The student stages (mimic, preference, eval of the students) join this recipe as they land.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.evaluation import evaluate_model
from shared.shards import dump_info, verify_dump
from shared.world import make_world
from teacher_dump.run import DumpConfig, dump_teacher
from teacher_dump.tiny_teacher import make_tiny_teacher


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    seed: int = 0
    eval_seed: int = 1  # held-out data comes from another seed
    n_mimic: int = 8000
    n_pref: int = 1000
    n_eval: int = 400
    teacher_steps: int = 1200
    shards: int = 4
    top_k: int = 32
    backend: str = "vllm"


def run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    timings: dict[str, float] = {}

    def step(name: str):
        print(f"== {name}", flush=True)
        timings[name] = time.time()

    world, held_out = out / "world", out / "eval_world"
    step("world")
    if not (world / "pref.jsonl").exists():
        make_world(world, cfg.seed, cfg.n_mimic, cfg.n_pref, 0)
    if not (held_out / "eval.jsonl").exists():
        make_world(held_out, cfg.eval_seed, 0, 0, cfg.n_eval)

    teacher = out / "teacher"
    step("teacher")
    if not (teacher / "lmod_recipe.json").exists():
        make_tiny_teacher(world, teacher, steps=cfg.teacher_steps, seed=cfg.seed)

    step("dump-teacher")
    dump_teacher(DumpConfig(
        model=teacher, out=out / "shards", mimic_data=world / "mimic.jsonl", pref_data=world / "pref.jsonl",
        shards=cfg.shards, top_k=cfg.top_k, backend=cfg.backend,
    ))
    problems = verify_dump(out / "shards")
    if problems:
        raise RuntimeError("shard verification failed: " + "; ".join(problems))

    step("eval")
    teacher_eval = evaluate_model(teacher, held_out / "eval.jsonl")
    rows = [{"model": "teacher", "path": str(teacher), "accuracy": teacher_eval["accuracy"],
             "hallucination_rate": teacher_eval.get("hallucination_rate"), **teacher_eval}]
    report = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "rows": rows, "shards": dump_info(out / "shards")}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_table(rows, report["shards"])
    return report


def _print_table(rows: list[dict], shards: dict) -> None:
    print(f"\n{'model':<12} {'accuracy':>9} {'halluc.':>8} {'POPE F1':>8}  by type")
    for r in rows:
        by_type = " ".join(f"{k}={v:.2f}" for k, v in r["accuracy_by_type"].items())
        acc, hal, f1 = r["accuracy"], r["hallucination_rate"], r["pope"]["f1"]
        print(f"{r['model']:<12} {acc:>9.3f} {hal:>8.3f} {f1:>8.3f}  {by_type}")
    m = shards.get("mimic", {})
    print(f"\nshards: {m.get('rows')} mimic rows, {m.get('tokens')} tokens, {m.get('bytes_per_token')} B/token, "
          f"top-k {shards['top_k']}, backend {shards['backend']}")
