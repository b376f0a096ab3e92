"""The embedded-default recipe: world -> tiny teacher -> teacher dump on Ray with vLLM ->
MoE student: SFT-only baseline, mimic distillation, mimic + preference distillation -> eval table.

Every step is skipped when its output already exists, so an interrupted demo resumes. Held-out
evaluation uses a world of another seed; nothing is tuned on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.evaluation import evaluate_model
from shared.shards import dump_info, verify_dump
from shared.world import make_world
from student_train.evaluate import kl_to_teacher
from student_train.moe import active_parameters, make_dense_student, upcycle
from student_train.train import TrainConfig, latest_checkpoint, train
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
    student_steps: int = 1500
    pref_steps: int = 300
    student_batch: int = 16
    configs: Path = Path(__file__).parent / "configs"


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

    step("student")
    student = out / "student-moe"
    if not (student / "config.json").exists():
        make_dense_student(teacher, out / "student-dense", seed=cfg.seed)
        upcycle(out / "student-dense", student, seed=cfg.seed)
    shards = [out / "shards"]
    runs = {
        "sft": ("sft.yaml", "mimic", student),
        "mimic": ("mimic.yaml", "mimic", student),
        "mimic+pref": ("pref.yaml", "pref", out / "mimic"),
    }
    for name, (yaml_name, stage, start) in runs.items():
        run_dir = out / name
        if (run_dir / "model.safetensors").exists():  # written once a run has finished
            continue
        steps = cfg.pref_steps if stage == "pref" else cfg.student_steps
        tcfg = TrainConfig.from_yaml(cfg.configs / yaml_name, steps=steps, batch_size=cfg.student_batch,
                                     seed=cfg.seed)
        step(f"train {name}")
        # An interrupted stage continues from its checkpoint; a fresh one starts (--resume refuses an empty run).
        train(shards, start, run_dir, tcfg, image_root=world, resume=latest_checkpoint(run_dir) is not None)

    step("held-out teacher dump")
    held_dump = out / "eval_shards"
    held_mimic = out / "eval_world_mimic"  # held-out conversations, for agreement with the teacher
    if not (held_mimic / "mimic.jsonl").exists():
        make_world(held_mimic, cfg.eval_seed + 1, 300, 0, 0)
    dump_teacher(DumpConfig(model=teacher, out=held_dump, mimic_data=held_mimic / "mimic.jsonl",
                            shards=1, top_k=cfg.top_k, backend="hf", progress=False))

    step("eval")
    rows = []
    for name, path in [("teacher", teacher), ("sft", out / "sft"), ("mimic", out / "mimic"),
                       ("mimic+pref", out / "mimic+pref")]:
        metrics = evaluate_model(path, held_out / "eval.jsonl")
        from transformers import AutoModelForImageTextToText

        n_active = active_parameters(AutoModelForImageTextToText.from_pretrained(str(path)))
        kl = kl_to_teacher(path, [held_dump], held_mimic)
        rows.append({"model": name, "path": str(path), "accuracy": metrics["accuracy"],
                     "hallucination_rate": metrics.get("hallucination_rate"), "active_params": n_active,
                     "kl_to_teacher": kl, **metrics})
    report = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "rows": rows, "shards": dump_info(out / "shards")}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_table(rows, report["shards"])
    from pipelines.report import report as plot_report

    for path in plot_report(out):
        print(f"plot: {path}")
    return report


def _print_table(rows: list[dict], shards: dict) -> None:
    print(f"\n{'model':<12} {'accuracy':>9} {'halluc.':>8} {'POPE F1':>8} {'KL->T':>7} {'active':>9}  by type")
    for r in rows:
        by_type = " ".join(f"{k}={v:.2f}" for k, v in r["accuracy_by_type"].items())
        acc, hal, f1 = r["accuracy"], r["hallucination_rate"], r["pope"]["f1"]
        kl = r["kl_to_teacher"]
        print(f"{r['model']:<12} {acc:>9.3f} {hal:>8.3f} {f1:>8.3f} {kl:>7.3f} {r['active_params']:>9}  {by_type}")
    m = shards.get("mimic", {})
    print(f"\nshards: {m.get('rows')} mimic rows, {m.get('tokens')} tokens, {m.get('bytes_per_token')} B/token, "
          f"top-k {shards['top_k']}, backend {shards['backend']}")
