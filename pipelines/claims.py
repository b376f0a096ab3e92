"""The paper's claims in miniature, over several seeds: the whole demo once per seed (training world
of that seed, held-out world of seed + 1000), then per-seed tables and mean +- std.

    python pipelines/claims.py --seeds 0 1 2 [--out runs/claims]

Claims checked per seed (the held-out world decides; nothing is tuned on it):
  1. mimic beats SFT: higher accuracy and lower KL to the teacher, same data and budget;
  2. preference distillation lowers hallucination below the mimic student's without collapsing:
     its POPE F1 is not below the mimic student's ("no" to everything has a hallucination rate of
     0 and an F1 of 0);
  3. the final student (mimic+pref), with fewer active parameters than the teacher, is within 5
     accuracy points of it (or above it).
Each seed's run resumes if interrupted (the demo skips finished steps). OUT/claims.txt holds the
tables, OUT/claims.json the numbers; `lmod report OUT` draws them (mean +- std) as OUT/demo.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

MODELS = ("teacher", "sft", "mimic", "mimic+pref")
MEASURES = (("accuracy", lambda r: r["accuracy"]), ("halluc.", lambda r: r["hallucination_rate"]),
            ("POPE F1", lambda r: r["pope"]["f1"]), ("yes-ratio", lambda r: r["pope"]["yes_ratio"]),
            ("KL->T", lambda r: r["kl_to_teacher"]))
EVAL_SEED_OFFSET = 1000


def claims(rows: dict[str, dict]) -> dict[str, bool]:
    """Which claims hold for one seed's report rows (by model name)."""
    sft, mimic, final, teacher = rows["sft"], rows["mimic"], rows["mimic+pref"], rows["teacher"]
    return {
        "mimic beats SFT (accuracy and KL)": mimic["accuracy"] > sft["accuracy"]
        and mimic["kl_to_teacher"] < sft["kl_to_teacher"],
        # No collapse, as the issue defines it: POPE F1 not below the mimic student's (saying "no" to
        # everything lowers hallucination too, and F1 with it).
        "pref lowers hallucination (no collapse)": final["hallucination_rate"] < mimic["hallucination_rate"]
        and final["pope"]["f1"] >= mimic["pope"]["f1"],
        "final within 5 points of the teacher": final["accuracy"] >= teacher["accuracy"] - 0.05
        and final["active_params"] < teacher["active_params"],
    }


def summary(reports: dict[int, dict]) -> dict:
    """Mean and sample std over seeds of every measure and per-type accuracy, by model."""
    out: dict[str, dict] = {}
    for model in MODELS:
        rows = [{r["model"]: r for r in rep["rows"]}[model] for rep in reports.values()]
        measures = {name: [get(r) for r in rows] for name, get in MEASURES}
        for qtype in sorted(rows[0]["accuracy_by_type"]):
            measures[f"accuracy {qtype}"] = [r["accuracy_by_type"].get(qtype, float("nan")) for r in rows]
        out[model] = {name: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0}
                      for name, v in measures.items()}
    return out


def verdicts(reports: dict[int, dict]) -> dict[int, dict[str, bool]]:
    """Which claims hold, per seed."""
    return {seed: claims({r["model"]: r for r in rep["rows"]}) for seed, rep in reports.items()}


def table(reports: dict[int, dict]) -> str:
    lines = [f"{'seed':<6}{'model':<12}" + "".join(f"{name:>10}" for name, _ in MEASURES)]
    for seed, report in reports.items():
        rows = {r["model"]: r for r in report["rows"]}
        for model in MODELS:
            lines.append(f"{seed:<6}{model:<12}" + "".join(f"{get(rows[model]):>10.3f}" for _, get in MEASURES))
    lines.append("")
    lines.append(f"{'mean +- std':<18}" + "".join(f"{name:>16}" for name, _ in MEASURES))
    stats = summary(reports)
    for model in MODELS:
        cells = [f"{stats[model][name]['mean']:>9.3f} +-{stats[model][name]['std']:.3f}" for name, _ in MEASURES]
        lines.append(f"{model:<18}" + "".join(f"{c:>16}" for c in cells))
    lines.append("")
    types = [k for k in stats["teacher"] if k.startswith("accuracy ")]
    lines.append(f"{'by type':<18}" + "".join(f"{t.split()[1]:>16}" for t in types))
    for model in MODELS:
        lines.append(f"{model:<18}" + "".join(f"{stats[model][t]['mean']:>9.3f} +-{stats[model][t]['std']:.3f}"
                                             for t in types))
    lines.append("")
    for seed, held in verdicts(reports).items():
        lines.append(f"seed {seed}: " + "; ".join(f"{k}: {'holds' if v else 'MISSES'}" for k, v in held.items()))
    lines.append("")
    for seed, report in reports.items():
        lines.append(f"seed {seed}: {teacher_line(report)}")
    return "\n".join(lines)


def teacher_line(report: dict) -> str:
    """The teacher against the bar on the held-out world, and which training try it is."""
    from pipelines.demo import meets_teacher_bar

    t = next(r for r in report["rows"] if r["model"] == "teacher")
    held = {"accuracy": t["accuracy"], "pope_accuracy": t["pope"]["accuracy"], "yes_ratio": t["pope"]["yes_ratio"]}
    line = (f"teacher on held-out: accuracy {held['accuracy']:.3f}, POPE accuracy {held['pope_accuracy']:.3f}, "
            f"yes-ratio {held['yes_ratio']:.3f}: {'meets' if meets_teacher_bar(held) else 'MISSES'} the bar")
    tries = report.get("teacher_tries") or []
    kept = [t for t in tries if t.get("kept")]
    if kept:
        line += (f" (try {kept[0]['try'] + 1} of {len(tries)}; on validation {kept[0]['accuracy']:.3f}, "
                 f"{kept[0]['pope_accuracy']:.3f}, {kept[0]['yes_ratio']:.3f})")
    return line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("runs/claims"))
    ap.add_argument("--table-only", action="store_true", help="print the table of finished seeds, run nothing")
    args = ap.parse_args()
    reports = {}
    for seed in args.seeds:
        out = args.out / f"seed-{seed}"
        if not args.table_only:
            from pipelines.demo import DemoConfig, run_demo

            run_demo(DemoConfig(out=out, seed=seed, eval_seed=seed + EVAL_SEED_OFFSET))
        if (out / "report.json").is_file():
            reports[seed] = json.loads((out / "report.json").read_text())
    if not reports:
        raise SystemExit(f"no finished seeds under {args.out}")
    text = table(reports)
    print(text)
    (args.out / "claims.txt").write_text(text + "\n")
    (args.out / "claims.json").write_text(json.dumps({"seeds": list(reports), "summary": summary(reports),
                                                      "claims": verdicts(reports)}, indent=2) + "\n")
    from pipelines.report import report

    for path in report(args.out):
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
