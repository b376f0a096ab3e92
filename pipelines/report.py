"""`lmod report RUN_DIR`: look, don't read. Training curves from `metrics.jsonl` (loss, KL or DPO
loss and preference accuracy, expert load per MoE layer) and, for a demo run, its table as bars
(mean +- std over seeds for a claims.py directory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training node
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; a last line cut mid-write by a kill is skipped, any other unreadable
    line is an error naming it."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for no, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if no == len(lines):
                continue
            raise ValueError(f"{path}:{no}: not a JSON line; the file was edited or damaged") from None
    return rows


def plot_training(run_dir: Path, out: Path | None = None) -> Path:
    """RUN_DIR/metrics.jsonl -> RUN_DIR/training.png (three panels)."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / "metrics.jsonl")
    if not rows:
        raise ValueError(f"{run_dir / 'metrics.jsonl'}: no metrics to plot")
    plt = _pyplot()
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(steps, [r["loss"] for r in rows], label="loss")
    if "ce" in rows[0]:
        axes[0].plot(steps, [r["ce"] for r in rows], label="CE", alpha=0.7)
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    if "kl" in rows[0]:
        axes[1].plot(steps, [r["kl"] for r in rows], color="C2")
        axes[1].set(title="KL(teacher || student) per token", xlabel="step")
    elif "sampled_kd" in rows[0]:  # RS-KD: cross-entropy to the teacher's draws (KL + the teacher's entropy)
        axes[1].plot(steps, [r["sampled_kd"] for r in rows], color="C2")
        axes[1].set(title="sampled KD (cross-entropy to teacher draws) per token", xlabel="step")
    else:
        axes[1].plot(steps, [r["dpo_loss"] for r in rows], color="C3", label="preference loss")
        twin = axes[1].twinx()
        twin.plot(steps, [r["pref_accuracy"] for r in rows], color="C4", alpha=0.6, label="pref. accuracy")
        twin.set_ylim(0, 1)
        axes[1].set(title="preference loss / accuracy", xlabel="step")
        axes[1].legend(loc="upper left")
        twin.legend(loc="upper right")
    layers = [r.get("expert_load_per_layer") or [r.get("expert_load", [])] for r in rows]
    n_layers, n_experts = len(layers[-1]), len(layers[-1][0]) if layers[-1] else 0
    for layer in range(n_layers):
        for expert in range(n_experts):
            axes[2].plot(steps, [ls[layer][expert] if layer < len(ls) else float("nan") for ls in layers],
                         color=f"C{expert}", linestyle=("-", "--", ":", "-.")[layer % 4],
                         label=f"layer {layer} expert {expert}" if n_layers * n_experts <= 16 else None)
    if n_experts:
        axes[2].axhline(1 / n_experts, color="grey", linewidth=0.8)
        axes[2].set(title="expert load (line style: MoE layer)", xlabel="step")
        if n_layers * n_experts <= 16:
            axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    target = Path(out) if out else run_dir / "training.png"
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


def _bar_panels(names: list[str], panels: list[tuple[str, list[float], list[float] | None]], title: str,
                target: Path) -> Path:
    """One bar chart per (title, values, stds or None) panel, a bar per model name."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    for ax, (panel, values, stds) in zip(axes, panels):
        shown = [max(0.0, v) for v in values]
        bars = ax.bar(names, shown, yerr=stds, capsize=4 if stds else 0, color=[f"C{i}" for i in range(len(names))])
        labels = [f"{v:.3f}" if stds is None else f"{v:.3f}\n+-{e:.3f}" for v, e in zip(values, stds or values)]
        ax.bar_label(bars, labels=labels, fontsize=8 if stds is None else 7)
        ax.set_ylim(0, 1.3 * max(v + (e if stds else 0.0) for v, e in zip(shown, stds or shown)) or 1.0)
        ax.set_title(panel)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target


# (panel title, claims.py's measure name, how to read it from a report row)
_DEMO_PANELS = (("accuracy", "accuracy", lambda r: r["accuracy"]),
                ("hallucination rate", "halluc.", lambda r: r["hallucination_rate"]),
                ("POPE F1", "POPE F1", lambda r: r["pope"]["f1"]),
                ("KL to teacher", "KL->T", lambda r: r["kl_to_teacher"]))


def plot_demo_table(report: Path, out: Path | None = None) -> Path:
    """The demo's report.json -> bars of accuracy, hallucination, POPE F1 and KL to the teacher."""
    rows = json.loads(Path(report).read_text())["rows"]
    panels = [(title, [get(r) for r in rows], None) for title, _, get in _DEMO_PANELS]
    return _bar_panels([r["model"] for r in rows], panels, f"lmod demo: {Path(report).parent}",
                       Path(out) if out else Path(report).with_name("demo.png"))


def plot_claims(claims: Path, out: Path | None = None) -> Path:
    """claims.py's claims.json -> the demo's bars as mean +- std over seeds."""
    try:
        data = json.loads(Path(claims).read_text())
        stats = data["summary"]
        names = list(stats)
        panels = [(title, [stats[m][key]["mean"] for m in names], [stats[m][key]["std"] for m in names])
                  for title, key, _ in _DEMO_PANELS]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{claims}: not a claims.py summary ({type(e).__name__}: {e}); rerun "
                         "python pipelines/claims.py --table-only --out DIR to rewrite it") from None
    return _bar_panels(names, panels, f"lmod demo over seeds {data['seeds']} (mean +- std): {Path(claims).parent}",
                       Path(out) if out else Path(claims).with_name("demo.png"))


def plot_sweep(sweep_dir: Path) -> list[Path]:
    """An `lmod sweep` directory -> sweep.png (a bar per configuration, mean +- std over seeds, a
    panel per metric) and curves.png (every trial's training loss, coloured by configuration)."""
    from pipelines.sweep import (
        SPEC_FILE,
        SweepError,
        SweepSpec,
        cell_stats,
        cells_of,
        collect,
        mean_std,
        summary_metrics,
        trial_dir,
    )

    sweep_dir = Path(sweep_dir)
    try:
        spec = SweepSpec(**json.loads((sweep_dir / SPEC_FILE).read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{sweep_dir / SPEC_FILE}: not an lmod sweep record ({e})") from None
    rows = collect(spec, sweep_dir)
    stats = cell_stats(spec, rows)
    metrics = [m for m in summary_metrics(spec, rows) if not m.startswith("accuracy_by_type.")]
    if not metrics:
        raise SweepError(f"{sweep_dir}: no trial has finished yet; nothing to plot")
    plt = _pyplot()
    cells = list(stats)
    cols = min(4, len(metrics))
    rows_n = (len(metrics) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n), squeeze=False)
    for ax, m in zip(axes.flat, metrics):
        kept = [c for c in cells if stats[c][m]]
        means, stds = zip(*(mean_std(stats[c][m]) for c in kept))
        ax.bar(range(len(kept)), means, yerr=stds, capsize=4, color=[f"C{cells.index(c)}" for c in kept])
        ax.set_xticks(range(len(kept)), kept, rotation=20, fontsize=7)
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"lmod sweep ({spec.stage}): mean +- std over seeds {spec.seeds}")
    fig.tight_layout()
    bars = sweep_dir / "sweep.png"
    fig.savefig(bars, dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (cell, trials) in enumerate(cells_of(spec.trials()).items()):
        for j, trial in enumerate(trials):
            path = trial_dir(sweep_dir, trial) / "run" / "metrics.jsonl"
            curve = read_metrics(path) if path.is_file() else []
            if curve:
                ax.plot([r["step"] for r in curve], [r["loss"] for r in curve], color=f"C{i}", alpha=0.8,
                        label=cell if j == 0 else None)
    ax.set(title="training loss per trial (one colour per configuration)", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = sweep_dir / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [bars, curves]


def report(run_dir: Path) -> list[Path]:
    """Everything plottable under RUN_DIR: a training run, a sweep, or a demo directory and its stages."""
    run_dir = Path(run_dir)
    if (run_dir / "sweep.json").is_file():
        return plot_sweep(run_dir)
    written = []
    if (run_dir / "report.json").is_file():
        written.append(plot_demo_table(run_dir / "report.json"))
    if (run_dir / "claims.json").is_file():  # claims.py over seeds: mean +- std
        written.append(plot_claims(run_dir / "claims.json"))
    empty = []
    for metrics in sorted([run_dir / "metrics.jsonl", *run_dir.glob("*/metrics.jsonl")]):
        if metrics.is_file():
            if not read_metrics(metrics):  # a run that has not finished a step yet: the others still plot
                empty.append(metrics)
                continue
            written.append(plot_training(metrics.parent))
    if not written:
        why = f" ({len(empty)} metrics.jsonl without a finished step yet, e.g. {empty[0]})" if empty else ""
        raise ValueError(f"{run_dir}: no metrics.jsonl or report.json to plot{why}")
    return written
