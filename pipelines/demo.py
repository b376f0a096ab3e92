"""The embedded-default recipe: world -> tiny teacher -> teacher dump on Ray with vLLM ->
MoE student: SFT-only baseline, mimic distillation, mimic + preference distillation -> eval table.

Every step is skipped when its output already exists, so an interrupted demo resumes. Held-out
evaluation uses a world of another seed; nothing is tuned on it. Choices are made on a validation
split of the *training* world: a teacher that misses TEACHER_BAR there is retrained from another
initialisation (up to `teacher_tries`), and the preference stage keeps the checkpoint that answers it
best (the mimic student itself is a candidate), so it cannot make the student worse on what it is
checked on.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.toy.tiny_teacher import make_tiny_teacher
from pipelines.toy.world import make_world
from shared.evaluation import evaluate_model
from shared.shards import dump_info, verify_dump
from student_train.evaluate import kl_to_teacher
from student_train.moe import active_parameters, make_dense_student, upcycle
from student_train.train import TrainConfig, checkpoint_step, latest_checkpoint, train
from teacher_dump.run import DumpConfig, dump_teacher


@dataclass
class DemoConfig:
    out: Path = Path("runs/demo")
    seed: int = 0
    eval_seed: int = 1  # held-out data comes from another seed
    n_mimic: int = 8000
    n_pref: int = 1000
    n_eval: int = 400
    n_val: int = 200  # validation questions from the training world, for the preference checkpoint choice
    pref_eval_every: int = 50
    teacher_steps: int = 1800
    teacher_tries: int = 2  # teachers trained (other initialisations) until one meets TEACHER_BAR on validation
    shards: int = 4
    top_k: int = 32
    backend: str = "vllm"
    student_steps: int = 1500
    pref_steps: int = 300
    student_batch: int = 16
    configs: Path = Path(__file__).parent / "configs"

    def world_seeds(self) -> dict[str, int]:
        """The seed of every world the demo draws: training (and its validation split), held-out
        questions, held-out conversations (the KL to the teacher)."""
        return {"training": self.seed, "held-out questions": self.eval_seed,
                "held-out conversations": self.eval_seed + 1}

    def __post_init__(self) -> None:
        seen: dict[int, str] = {}
        for role, seed in self.world_seeds().items():
            if seed in seen:
                raise ValueError(f"the {role} world would be the {seen[seed]} world (seed {seed}; the held-out "
                                 f"conversations use --eval-seed + 1): choose a --seed other than {self.eval_seed} "
                                 f"and {self.eval_seed + 1}, or another --eval-seed")
            seen[seed] = role
        if self.teacher_tries < 1:
            raise ValueError(f"--teacher-tries {self.teacher_tries}: train at least one teacher")


def run_demo(cfg: DemoConfig) -> dict:
    """Same seed, same machine, same report: no nondeterministic kernels, a fixed thread count (the
    process's settings are restored afterwards)."""
    import os

    import torch

    # Deterministic cuBLAS needs a fixed workspace, set before the first cuBLAS call (else the first
    # matmul on a GPU raises); inherited by the Ray workers started after it. No effect on the CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    try:
        return _run_demo(cfg)
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


def _run_demo(cfg: DemoConfig) -> dict:
    out = Path(cfg.out)
    timings: dict[str, float] = {}

    def step(name: str):
        print(f"== {name}", flush=True)
        timings[name] = time.time()

    world, held_out = out / "world", out / "eval_world"
    seeds = cfg.world_seeds()
    step("world")
    if not (world / "eval.jsonl").exists():  # eval.jsonl here: the validation split of the training world
        make_world(world, seeds["training"], cfg.n_mimic, cfg.n_pref, cfg.n_val)
    if not (held_out / "eval.jsonl").exists():
        make_world(held_out, seeds["held-out questions"], 0, 0, cfg.n_eval)

    teacher = out / "teacher"
    step("teacher")
    teacher_tries = teacher_with_validation(world, teacher, cfg.teacher_steps, cfg.seed, cfg.teacher_tries)

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
    runs = {"sft": ("sft.yaml", student), "mimic": ("mimic.yaml", student)}
    for name, (yaml_name, start) in runs.items():
        run_dir = out / name
        if (run_dir / "model.safetensors").exists():  # written once a run has finished
            continue
        tcfg = TrainConfig.from_yaml(cfg.configs / yaml_name, steps=cfg.student_steps, batch_size=cfg.student_batch,
                                     seed=cfg.seed)
        step(f"train {name}")
        # An interrupted stage continues from its checkpoint; a fresh one starts (--resume refuses an empty run).
        train(shards, start, run_dir, tcfg, image_root=world, resume=latest_checkpoint(run_dir) is not None)
    if not (out / "mimic+pref" / "model.safetensors").exists():
        step("train mimic+pref")
        tcfg = TrainConfig.from_yaml(cfg.configs / "pref.yaml", steps=cfg.pref_steps, batch_size=cfg.student_batch,
                                     seed=cfg.seed)
        preference_with_selection(shards, out / "mimic", out / "pref-run", out / "mimic+pref", tcfg, world,
                                  cfg.pref_eval_every)

    step("held-out teacher dump")
    held_dump = out / "eval_shards"
    held_mimic = out / "eval_world_mimic"  # held-out conversations, for agreement with the teacher
    if not (held_mimic / "mimic.jsonl").exists():
        make_world(held_mimic, seeds["held-out conversations"], 300, 0, 0)
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
    report = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "rows": rows, "shards": dump_info(out / "shards"),
              "teacher_tries": teacher_tries}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    _print_table(rows, report["shards"])
    kept = next(t for t in teacher_tries if t["kept"])
    print(f"teacher: try {kept['try'] + 1} of {len(teacher_tries)} (init seed {kept['init_seed']}), validation "
          f"accuracy {kept['accuracy']:.3f}, POPE accuracy {kept['pope_accuracy']:.3f}, "
          f"yes-ratio {kept['yes_ratio']:.3f}")
    from pipelines.report import report as plot_report

    for path in plot_report(out):
        print(f"plot: {path}")
    return report


# What the demo asks of its teacher on the validation split of the training world (the bar that the
# README's claims hold it to on held-out worlds): a teacher that misses it has nothing to distil.
TEACHER_BAR = {"accuracy": 0.85, "pope_accuracy": 0.85, "yes_ratio": (0.35, 0.65)}


def meets_teacher_bar(row: dict) -> bool:
    low, high = TEACHER_BAR["yes_ratio"]
    return (row["accuracy"] >= TEACHER_BAR["accuracy"] and row["pope_accuracy"] >= TEACHER_BAR["pope_accuracy"]
            and low <= row["yes_ratio"] <= high)


_TRY_KEYS = {"try", "init_seed", "trained_in", "accuracy", "meets_bar"}


def _tries_log(history: object) -> bool:
    """Whether a teacher-tries.json holds what this demo writes: one entry per try, in order."""
    return isinstance(history, list) and all(
        isinstance(h, dict) and _TRY_KEYS <= set(h) and h["try"] == i for i, h in enumerate(history))


def teacher_with_validation(world: Path, teacher: Path, steps: int, seed: int, tries: int) -> list[dict]:
    """Train the tiny teacher and check it on WORLD/eval.jsonl (the validation split of the training
    world); while it misses TEACHER_BAR, train another from another initialisation (seed + 1000 * try),
    up to TRIES. The first that meets the bar becomes TEACHER, else the best by validation accuracy.
    Why: a 2-layer teacher learns each lookup in a jump, and some initialisations have not made the
    jump for one question type within the step budget. TEACHER/../teacher-tries.json records every
    try, so an interrupted run resumes without retraining a finished one."""
    log = teacher.with_name(teacher.name + "-tries.json")
    try:
        history: list[dict] = json.loads(log.read_text()) if log.exists() else []
    except (json.JSONDecodeError, UnicodeDecodeError):  # the tries on disk are validated again: nothing is lost
        history = None
    if not _tries_log(history):  # damaged, or valid JSON of another shape (edited by hand)
        print(f"   {log}: unreadable (damaged); validating the teachers on disk again", flush=True)
        history = []

    def validate(attempt: int, model_dir: Path) -> None:
        metrics = evaluate_model(model_dir, world / "eval.jsonl")
        row = {"try": attempt, "init_seed": seed + 1000 * attempt, "trained_in": str(model_dir),
               "accuracy": metrics["accuracy"], "pope_accuracy": metrics["pope"]["accuracy"],
               "yes_ratio": metrics["pope"]["yes_ratio"], "accuracy_by_type": metrics["accuracy_by_type"]}
        row["meets_bar"] = meets_teacher_bar(row)
        history.append(row)
        log.write_text(json.dumps(history, indent=2) + "\n")
        print(f"   teacher try {attempt + 1}: validation accuracy {row['accuracy']:.3f}, POPE accuracy "
              f"{row['pope_accuracy']:.3f}, yes-ratio {row['yes_ratio']:.3f}: "
              f"{'meets' if row['meets_bar'] else 'misses'} the bar", flush=True)

    if (teacher / "lmod_recipe.json").exists():
        if not history:  # a run directory from before the tries: its teacher is the one try
            validate(0, teacher)
    else:
        for attempt in range(tries):
            if attempt == len(history):
                candidate = teacher.with_name(f"{teacher.name}-try{attempt}")
                if not (candidate / "lmod_recipe.json").exists():  # written last: a half-trained try restarts
                    shutil.rmtree(candidate, ignore_errors=True)
                    make_tiny_teacher(world, candidate, steps=steps, seed=seed + 1000 * attempt)
                validate(attempt, candidate)
            if history[attempt]["meets_bar"]:
                break
    passing = [h for h in history if h["meets_bar"]]
    chosen = passing[0] if passing else max(history, key=lambda h: (h["accuracy"], -h["try"]))
    for h in history:
        h["kept"] = h is chosen
    if not (teacher / "lmod_recipe.json").exists():
        shutil.rmtree(teacher, ignore_errors=True)  # a teacher half-written by an older run
        Path(chosen["trained_in"]).rename(teacher)
    log.write_text(json.dumps(history, indent=2) + "\n")
    return history


def preference_with_selection(shards: list[Path], start: Path, run_dir: Path, final: Path, tcfg: TrainConfig,
                              world: Path, every: int) -> list[dict]:
    """Preference distillation in segments of `every` steps (exact resume between them); after each
    segment the checkpoint answers WORLD/eval.jsonl, the validation split of the training world.
    The best by validation accuracy (ties: the earlier) becomes FINAL; step 0, the starting student,
    is a candidate. RUN_DIR/selection.json records every candidate, so an interrupted run resumes."""
    log = run_dir / "selection.json"
    run_dir.mkdir(parents=True, exist_ok=True)
    history = json.loads(log.read_text()) if log.exists() else []
    best = run_dir / "best"

    def consider(step: int, model_dir: Path) -> None:
        metrics = evaluate_model(model_dir, world / "eval.jsonl")
        row = {"step": step, "accuracy": metrics["accuracy"], "hallucination_rate": metrics.get("hallucination_rate"),
               "pope_f1": metrics["pope"]["f1"]}
        if not history or row["accuracy"] > max(h["accuracy"] for h in history):
            tmp = run_dir / "best.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(model_dir, tmp, ignore=shutil.ignore_patterns("trainer_state.pt", "checkpoint-*",
                                                                         "latest_checkpoint", "*.jsonl", "*.png"))
            shutil.rmtree(best, ignore_errors=True)
            tmp.rename(best)
        history.append(row)
        log.write_text(json.dumps(history, indent=2) + "\n")
        print(f"   validation at step {step}: accuracy {row['accuracy']:.3f}, hallucination "
              f"{row['hallucination_rate']:.3f}, POPE F1 {row['pope_f1']:.3f}", flush=True)

    if not history:
        consider(0, start)
    while True:
        # The checkpoint says how far training got (a kill between a segment and its validation
        # leaves a checkpoint the log has not seen yet: it is validated first, not trained past).
        ckpt = latest_checkpoint(run_dir)
        step = checkpoint_step(ckpt) if ckpt else 0
        if step > history[-1]["step"]:
            consider(step, ckpt)
        elif step >= tcfg.steps:
            break
        else:
            train(shards, start, run_dir, tcfg, image_root=world, resume=ckpt is not None, stop_after=every,
                  progress=False)
    chosen = max(history, key=lambda h: (h["accuracy"], -h["step"]))
    print(f"   kept step {chosen['step']} of the preference stage (validation accuracy {chosen['accuracy']:.3f})")
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(best, tmp)
    (tmp / "selection.json").write_text(json.dumps({"kept_step": chosen["step"], "candidates": history}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return history


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
