"""`lmod sweep`: student ablations over one teacher dump, trials scheduled by Ray Tune.

The trials are the cross product of the `--set` values times the seeds. Each is `lmod train` then
`lmod eval` (the same functions with the same defaults) into SWEEP/trials/NAME/: `run/` is the
training OUT, `eval.json` what `lmod eval --out` would write, `result.json` the trial's row, written
last. A trial with a result.json is finished: a rerun keeps it and hands only the others to Ray Tune;
a trial killed mid-run resumes from its last checkpoint (`save_every`), else starts again. The dump is
checked once, here, never per trial, and the teacher is never run.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from shared.manifest import atomic_write_bytes
from student_train.config import TrainConfig

SPEC_FILE = "sweep.json"
STUDENT = "student"  # the grid key of several --student directories (every other key is a TrainConfig field)
TRIALS_DIR = "trials"
RESULT_FILE = "result.json"
ERROR_FILE = "error.txt"
LOCK_FILE = ".lmod-sweep.lock"
# Metrics where lower is better (the rest: higher is better; yes_ratio and counts: neither).
_LOWER = re.compile(r"(^|[._])(kl|loss|hallucination_rate|ce|aux|z|dpo_loss|sampled_kd)($|[._])")
_NEITHER = re.compile(r"yes_ratio|tokens|steps|wall_s|expert_utilisation|grad_norm")


class SweepError(ValueError):
    """A sweep that cannot start or go on; the message says which flag or file and what to do."""


# ----------------------------------------------------------------------------------------------
# The grid: --set KEY=V1,V2 and --seeds


def _split_values(text: str) -> list[str]:
    """V1,V2 at commas outside brackets: `train=[experts,router],[all]` is two values."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "[{("
        depth -= ch in "]})"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts]


def _parse_value(text: str) -> Any:
    """A value as YAML reads it, except that 1e-3 is the number YAML 1.1 would leave as text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`--set KEY=V1,V2` (repeatable) -> {key: [values]}, keys in the order given."""
    known = {f.name for f in fields(TrainConfig)}
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not values.strip():
            raise SweepError(f"--set {item!r}: write KEY=V1,V2 (a TrainConfig key and the values to try)")
        if key == "seed":
            raise SweepError("--set seed=...: seeds are swept with --seeds S [S ...]")
        if key == "stage":
            raise SweepError("--set stage=...: a sweep trains one --stage; run one sweep per stage")
        if key == "student":
            raise SweepError("--set student=...: give each student as --student DIR (repeat the flag)")
        if key not in known:
            raise SweepError(f"--set {key}: not a TrainConfig key; the keys are listed in docs/config.md")
        if key in grid:
            raise SweepError(f"--set {key}: given twice; list all its values in one --set {key}=V1,V2")
        parsed = [_parse_value(v) for v in _split_values(values)]
        if len({json.dumps(v, sort_keys=True) for v in parsed}) < len(parsed):
            raise SweepError(f"--set {item!r}: a value is listed twice")
        grid[key] = parsed
    return grid


def _slug(key: str, value: Any) -> str:
    if key == STUDENT:  # a directory: its name tells the cells apart
        value = Path(value).name
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.,+-]", "_", text)


@dataclass(frozen=True)
class Trial:
    index: int
    overrides: dict[str, Any]  # swept key -> this trial's value
    seed: int

    @property
    def name(self) -> str:
        swept = "-".join(f"{k}={_slug(k, v)}" for k, v in self.overrides.items())
        return f"{self.index:03d}-{swept + '-' if swept else ''}seed={self.seed}"

    @property
    def cell(self) -> str:
        """The configuration without the seed: what the summary averages over."""
        return ", ".join(f"{k}={_slug(k, v)}" for k, v in self.overrides.items()) or "base"


# ----------------------------------------------------------------------------------------------
# What a sweep is: recorded in SWEEP/sweep.json, the same on every rerun


@dataclass
class SweepSpec:
    stage: str
    dumps: list[str]
    student: str  # the first --student: the base
    base: dict[str, Any]  # the base TrainConfig (--config and the flags), seed excluded
    grid: dict[str, list[Any]]  # swept keys and their values; "student": several --student directories
    seeds: list[int]
    image_root: str | None = None
    eval_data: str | None = None
    eval_image_root: str | None = None
    held_out: list[str] = field(default_factory=list)
    held_out_image_root: str | None = None
    allow_partial: bool = False
    # How a trial runs, not what it computes: may change between reruns.
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0

    _RESOURCES = ("cpus_per_trial", "gpus_per_trial")

    def trials(self) -> list[Trial]:
        combos = itertools.product(*self.grid.values()) if self.grid else [()]
        cells = [dict(zip(self.grid, combo)) for combo in combos]
        return [Trial(i, cell, seed) for i, (cell, seed) in enumerate(itertools.product(cells, self.seeds))]

    def config(self, trial: Trial) -> TrainConfig:
        changed = {k: v for k, v in trial.overrides.items() if k != STUDENT}
        return TrainConfig(**{**self.base, **changed, "seed": trial.seed})

    def student_of(self, trial: Trial) -> Path:
        return Path(trial.overrides.get(STUDENT, self.student))

    @property
    def students(self) -> list[str]:
        return list(self.grid.get(STUDENT, [self.student]))

    def identity(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self._RESOURCES}

    def base_cell(self) -> str | None:
        """The cell whose swept values are the base config's, when the grid holds it."""
        base = {**self.base, STUDENT: self.student}
        if all(base.get(k) in values for k, values in self.grid.items()):
            return Trial(0, {k: base.get(k) for k in self.grid}, 0).cell
        return None

    def check(self) -> list[TrainConfig]:
        """Every trial's config, validated before anything starts (one line naming the value)."""
        configs = []
        for trial in self.trials():
            try:
                configs.append(self.config(trial))
            except ValueError as e:
                shown = ", ".join(f"{k}={v}" for k, v in trial.overrides.items())
                raise SweepError(f"--set {shown}: {e}") from None
        return configs


def trial_dir(root: Path, trial: Trial) -> Path:
    return Path(root) / TRIALS_DIR / trial.name


def finished(root: Path, trial: Trial) -> bool:
    return (trial_dir(root, trial) / RESULT_FILE).is_file()


# ----------------------------------------------------------------------------------------------
# One trial: train, then evaluate (runs in a Ray Tune worker; callable directly too)


def run_trial(spec: SweepSpec, trial: Trial, root: Path) -> dict[str, Any]:
    """`lmod train` then `lmod eval` for one trial; writes and returns its result row."""
    from shared.evaluation import evaluate_model
    from student_train.evaluate import held_out_agreement
    from student_train.train import LATEST, train

    here = trial_dir(root, trial)
    here.mkdir(parents=True, exist_ok=True)
    (here / ERROR_FILE).unlink(missing_ok=True)
    run = here / "run"
    cfg = spec.config(trial)
    start = time.time()
    history = train([Path(d) for d in spec.dumps], spec.student_of(trial), run, cfg,
                    image_root=Path(spec.image_root) if spec.image_root else None,
                    resume=(run / LATEST).exists(), progress=False, allow_partial=spec.allow_partial,
                    verify_shards=False)  # checked once by the sweep, not per trial
    train_s = time.time() - start
    metrics: dict[str, Any] = {}
    if spec.eval_data:
        metrics.update(evaluate_model(run, Path(spec.eval_data),
                                      Path(spec.eval_image_root) if spec.eval_image_root else None, device="auto"))
    if spec.held_out:
        metrics.update(held_out_agreement(run, [Path(d) for d in spec.held_out],
                                          Path(spec.held_out_image_root) if spec.held_out_image_root else None,
                                          device="auto"))
    atomic_write_bytes(here / "eval.json", (json.dumps(metrics, indent=2) + "\n").encode())
    last = _last_metrics(run / "metrics.jsonl")
    result = {
        "trial": trial.name, **{k: v for k, v in trial.overrides.items()}, "seed": trial.seed,
        **flatten(metrics),
        **{f"train_{k}": v for k, v in last.items()
           if isinstance(v, (int, float)) and k not in ("step", "grad_norm", "lr", "elapsed_s")},
        "steps": last.get("step", 0),
        "wall_s": round(time.time() - start, 3),
        "tokens_per_s": round(sum(r.get("tokens", 0) for r in history) / train_s, 1) if history else None,
    }
    atomic_write_bytes(here / RESULT_FILE, (json.dumps(result, indent=1) + "\n").encode())
    return result


def _last_metrics(path: Path) -> dict[str, Any]:
    from pipelines.report import read_metrics

    rows = read_metrics(path) if path.is_file() else []
    return rows[-1] if rows else {}


def flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested eval metrics as flat columns: pope.f1, accuracy_by_type.color, expert_utilisation.0."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            flat.update(flatten(dict(enumerate(value)), f"{name}."))
        else:
            flat[name] = value
    return flat


def _tune_trial(config: dict[str, Any], spec: dict[str, Any], root: str) -> None:
    """The Ray Tune trainable: one trial; its error, if any, is the trial's one line in error.txt."""
    import torch
    from ray import tune

    sweep = SweepSpec(**spec)
    torch.set_num_threads(max(1, int(sweep.cpus_per_trial)))  # Ray sets 1 thread per worker otherwise
    trial = next(t for t in sweep.trials() if t.name == config["trial"])
    try:
        result = run_trial(sweep, trial, Path(root))
    except Exception as e:  # reported by the sweep; the other trials go on
        line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        atomic_write_bytes(trial_dir(Path(root), trial) / ERROR_FILE, (line + "\n").encode())
        tune.report({"failed": 1})
        return
    tune.report({"failed": 0, **{k: v for k, v in result.items() if isinstance(v, (int, float))}})


# ----------------------------------------------------------------------------------------------
# The sweep


@dataclass
class SweepOutcome:
    rows: list[dict[str, Any]]  # one per trial, in trial order (finished, failed or not run)
    ran: list[str]  # trials run by this invocation
    kept: list[str]  # trials finished by an earlier one

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") != "finished"]


def run_sweep(spec: SweepSpec, root: Path, address: str | None = None, progress: bool = True) -> SweepOutcome:
    """Checks everything once, runs the unfinished trials on Ray Tune, writes results.csv and
    summary.md."""
    root = Path(root)
    spec.check()
    with _exclusive(root):
        new = _check_spec(spec, root)
        _check_inputs(spec, progress)
        if new is not None:  # written once the inputs are known good: a refused sweep leaves none
            atomic_write_bytes(root / SPEC_FILE, (json.dumps(new, indent=1) + "\n").encode())
        trials = spec.trials()
        kept = [t.name for t in trials if finished(root, t)]
        pending = [t for t in trials if not finished(root, t)]
        _say(progress, f"lmod: sweep of {len(trials)} trials ({len(cells_of(trials))} configs x "
                       f"{len(spec.seeds)} seeds): {len(kept)} finished earlier, {len(pending)} to run")
        if pending:
            _tune(spec, root, pending, address, progress)
        rows = collect(spec, root)
        write_results(spec, root, rows)
    return SweepOutcome(rows, [t.name for t in pending], kept)


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line, file=sys.stderr, flush=True)


@contextmanager
def _exclusive(root: Path) -> Iterator[None]:
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK_FILE, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"{root}: another lmod sweep is running there; wait for it or use another --out") \
                from None
        yield


def _check_spec(spec: SweepSpec, root: Path) -> dict[str, Any] | None:
    """SWEEP/sweep.json is written by the first run; a rerun must describe the same sweep. Returns
    what to record (None: recorded already)."""
    path = root / SPEC_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise SweepError(f"{path}: not JSON (damaged); move it away to start the sweep again") from None
        mine = json.loads(json.dumps(spec.identity()))
        changed = sorted(k for k in mine if old.get(k) != mine[k])
        if changed:
            raise SweepError(f"--out {root} holds a sweep with other settings ({', '.join(changed)} differ); "
                             "rerun it as it was started, or sweep into another --out")
        return None
    if any(root.iterdir()) and not (root / TRIALS_DIR).exists() and [p.name for p in root.iterdir()] != [LOCK_FILE]:
        raise SweepError(f"--out {root} is not empty and holds no sweep; sweep into a new or empty directory")
    return spec.identity()


def _check_inputs(spec: SweepSpec, progress: bool) -> None:
    """The dump (every file's hash, once), the student, the evaluation data: before Ray starts."""
    from shared.evaluation import read_eval_records
    from shared.mllm import load_encoder
    from student_train.cross_tokenizer import AlignmentError, TokenBridge
    from student_train.data import check_shards
    from student_train.dumps import Dumps

    dumps = Dumps.open([Path(d) for d in spec.dumps])
    configs = spec.check()
    for cfg in configs:
        if cfg.dump_mix is not None and len(cfg.dump_mix) != len(dumps):
            raise SweepError(f"dump_mix {cfg.dump_mix} has {len(cfg.dump_mix)} shares for {len(dumps)} --dump "
                             "directories; give one share per --dump, in the order given")
    for student in spec.students:  # each student's tokenizer against the dump's
        encoder = load_encoder(Path(student))
        try:
            bridge = TokenBridge.for_dumps(dumps, encoder, configs[0].cross_vocab)
        except AlignmentError as e:
            raise SweepError(str(e)) from None
        for sampled in sorted({c.stage == "mimic" and c.kd == "sampled" for c in configs}):
            if sampled and bridge is not None:
                raise SweepError(f"--student {student}: kd: sampled reads the teacher's draws in its own ids; a "
                                 "student with another tokenizer trains with kd: topk")
            files = check_shards(dumps, spec.stage, encoder, allow_partial=spec.allow_partial, sampled=sampled,
                                 cross=bridge is not None, verify=student == spec.students[0])
        if spec.held_out:
            held = Dumps.open([Path(d) for d in spec.held_out])
            check_shards(held, "mimic", encoder, cross=TokenBridge.for_dumps(held, encoder) is not None,
                         verify=student == spec.students[0])
    if spec.image_root is None:  # where the teacher found the images: the same for every trial
        recorded = dumps.image_root(spec.stage)
        spec.image_root = str(recorded) if recorded else None
    _say(progress, f"lmod: trials read the dump {', '.join(spec.dumps)} ({len(files)} {spec.stage} shards, checked "
                   "once); the teacher is not run")
    if spec.eval_data:
        read_eval_records(Path(spec.eval_data), Path(spec.eval_image_root or Path(spec.eval_data).parent))


def cells_of(trials: list[Trial]) -> dict[str, list[Trial]]:
    cells: dict[str, list[Trial]] = {}
    for t in trials:
        cells.setdefault(t.cell, []).append(t)
    return cells


def _tune(spec: SweepSpec, root: Path, pending: list[Trial], address: str | None, progress: bool) -> None:
    """The pending trials as one Ray Tune grid, each with a trial's resources."""
    from ray import tune

    from teacher_dump.run import ray_session

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter is silent at verbose=0
    total = len(spec.trials())

    class Progress(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            name = trial.config["trial"]
            error = trial_dir(root, next(t for t in pending if t.name == name)) / ERROR_FILE
            if error.is_file():
                _say(progress, f"lmod: trial {name} failed: {error.read_text().strip()}")
                return
            shown = {k: v for k, v in (trial.last_result or {}).items()
                     if k in ("accuracy", "kl_to_teacher", "train_loss")}
            _say(progress, f"lmod: trial {name} finished ({len(list((root / TRIALS_DIR).glob('*/' + RESULT_FILE)))}"
                           f"/{total}): " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            _say(progress, f"lmod: trial {trial.config['trial']} stopped with an error (see {root / 'ray_tune'})")

    attempt = 1 + len(list((root / "ray_tune").glob("attempt-*")))
    trainable = tune.with_resources(tune.with_parameters(_tune_trial, spec=asdict(spec), root=str(root.resolve())),
                                    {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    with ray_session(address):
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search([t.name for t in pending])},
            tune_config=tune.TuneConfig(num_samples=1),
            run_config=tune.RunConfig(name=f"attempt-{attempt}", storage_path=str((root / "ray_tune").resolve()),
                                      failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                      callbacks=[Progress()]),
        )
        grid = tuner.fit()
    for result in grid:  # a worker that died (out of memory, killed) wrote no error.txt: Tune's error is it
        name = (result.config or {}).get("trial")
        trial = next((t for t in pending if t.name == name), None)
        if trial is not None and result.error is not None and not finished(root, trial):
            line = str(result.error).strip().splitlines()[-1] if str(result.error).strip() else type(result.error)
            here = trial_dir(root, trial)
            here.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(here / ERROR_FILE, f"{line}\n".encode())


# ----------------------------------------------------------------------------------------------
# Results: results.csv and summary.md


def collect(spec: SweepSpec, root: Path) -> list[dict[str, Any]]:
    """One row per trial: its result, or its error, or that it has not run."""
    rows = []
    for trial in spec.trials():
        here = trial_dir(root, trial)
        if (here / RESULT_FILE).is_file():
            rows.append({"status": "finished", **json.loads((here / RESULT_FILE).read_text())})
            continue
        base = {"trial": trial.name, **trial.overrides, "seed": trial.seed}
        if (here / ERROR_FILE).is_file():
            rows.append({"status": "failed", **base, "error": (here / ERROR_FILE).read_text().strip()})
        else:
            rows.append({"status": "not run", **base})
    return rows


def write_results(spec: SweepSpec, root: Path, rows: list[dict[str, Any]]) -> None:
    lead = ["trial", "status", *spec.grid, "seed"]
    rest: list[str] = []
    for row in rows:
        rest += [k for k in row if k not in lead and k not in rest and k != "error"]
    columns = [*lead, *sorted(rest, key=_column_order), "error"]
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell_text(row.get(k)) for k in columns})
    atomic_write_bytes(root / "results.csv", text.getvalue().encode())
    atomic_write_bytes(root / "summary.md", summary_markdown(spec, rows).encode())


def _column_order(name: str) -> tuple[int, str]:
    group = 2 if name.startswith("train_") else 3 if name in ("steps", "wall_s", "tokens_per_s") else \
        4 if name.startswith("expert_utilisation") else 1
    return group, name


def _cell_text(value: Any) -> Any:
    if isinstance(value, list):
        return json.dumps(value)
    return "" if value is None else value


def summary_metrics(spec: SweepSpec, rows: list[dict[str, Any]]) -> list[str]:
    """The numeric columns worth a summary line: eval metrics and the final loss terms."""
    names: list[str] = []
    skip = {"seed", "n", *spec.grid}
    for row in rows:
        if row.get("status") != "finished":
            continue
        for k, v in row.items():
            if (isinstance(v, (int, float)) and not isinstance(v, bool) and k not in names and k not in skip
                    and not _NEITHER.search(k)):
                names.append(k)
    return sorted(names, key=_column_order)


def direction(metric: str) -> int:
    """+1: higher is better, -1: lower is better."""
    return -1 if _LOWER.search(metric) else 1


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def cell_stats(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """cell -> metric -> the finished trials' values (over seeds)."""
    by_name = {r["trial"]: r for r in rows}
    stats: dict[str, dict[str, list[float]]] = {}
    metrics = summary_metrics(spec, rows)
    for cell, trials in cells_of(spec.trials()).items():
        done = [by_name[t.name] for t in trials if by_name.get(t.name, {}).get("status") == "finished"]
        stats[cell] = {m: [float(r[m]) for r in done if isinstance(r.get(m), (int, float))] for m in metrics}
    return stats


def bestcells_of(stats: dict[str, dict[str, list[float]]], metrics: list[str]) -> dict[str, str]:
    """metric -> the cell with the best mean, where one cell is strictly best."""
    best = {}
    for m in metrics:
        means = {c: mean_std(v[m])[0] for c, v in stats.items() if v[m]}
        if len(means) < 2:
            continue
        ranked = sorted(means, key=lambda c: -direction(m) * means[c])
        if means[ranked[0]] != means[ranked[1]]:
            best[m] = ranked[0]
    return best


def summary_markdown(spec: SweepSpec, rows: list[dict[str, Any]]) -> str:
    """A row per metric, a column per cell: mean +- std over seeds (the best cell in bold), then
    each cell's difference to the base config with its standard error, then unfinished trials."""
    stats = cell_stats(spec, rows)
    metrics = summary_metrics(spec, rows)
    cells = list(stats)
    base = spec.base_cell()
    swept = "; ".join(f"{k} in {', '.join(_slug(k, v) for v in values)}" for k, values in spec.grid.items()) \
        or "no keys (seeds only)"
    finished_n = {c: max((len(v) for v in stats[c].values()), default=0) for c in cells}
    lines = [f"# lmod sweep: {spec.stage}", "",
             f"{len(rows)} trials: {swept} x seeds {spec.seeds}; "
             f"{sum(r['status'] == 'finished' for r in rows)} finished. Mean +- std over seeds "
             "(n: finished seeds); **bold**: the best configuration per metric (lower is better for losses, KL "
             "and hallucination, higher for the rest).", ""]
    if not metrics:
        return "\n".join([*lines, "No trial has finished yet.", "", *_unfinished(rows)])
    best = bestcells_of(stats, metrics)
    names = [f"{c}{' (base)' if c == base else ''}, n={finished_n[c]}" for c in cells]
    lines += ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(cells)]
    for m in metrics:
        shown = []
        for c in cells:
            if not stats[c][m]:
                shown.append("")
                continue
            mean, std = mean_std(stats[c][m])
            text = f"{mean:.4g} +- {std:.2g}"
            shown.append(f"**{text}**" if best.get(m) == c else text)
        lines.append(f"| {m} | " + " | ".join(shown) + " |")
    lines.append("")
    others = [c for c in cells if c != base]
    if base is not None and others:
        lines += [f"Difference to the base configuration ({base}) +- its standard error, "
                  "sqrt(s1^2/n1 + s2^2/n2):", "",
                  "| metric | " + " | ".join(others) + " |", "|---|" + "---|" * len(others)]
        for m in metrics:
            shown = []
            for c in others:
                a, b = stats[c][m], stats[base][m]
                if not a or not b:
                    shown.append("")
                    continue
                (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
                shown.append(f"{ma - mb:+.4g} +- {math.sqrt(sa**2 / len(a) + sb**2 / len(b)):.2g}")
            lines.append(f"| {m} | " + " | ".join(shown) + " |")
        lines.append("")
    return "\n".join([*lines, *_unfinished(rows)])


def _unfinished(rows: list[dict[str, Any]]) -> list[str]:
    failed = [r for r in rows if r["status"] != "finished"]
    if not failed:
        return []
    return ["Not finished:", "", *[f"- {r['trial']}: {r.get('error', r['status'])}" for r in failed], ""]
