"""Cross-tokenizer distillation on the tiny world, side by side in one run: the same data and steps for

  1. SFT only: a student with another BPE, labels only (its own tokens of the answers);
  2. cross-tokenizer mimic: that student learning the teacher's restated rows (teacher tokens it lacks:
     mass to the rest bucket, or `cross_vocab: first_token`, to its first token of their text);
  3. same-tokenizer mimic: the same student with the teacher's tokenizer (the reference);
  4. the reference student with its token ids permuted (an equivalent model) through the
     cross-tokenizer path: the same tokens and compute as 3, so its steps/s over 3's is what the
     path itself costs (goal >= 0.8).

Reported per run: held-out accuracy, exact-answer agreement with the teacher's greedy answers
(tokenizer independent), steps/s; the share of positions and top-k mass that pair.

    python pipelines/benchmarks/bench_cross_tokenizer.py --shards runs/demo/shards --world runs/demo/world \
        --eval-world runs/demo/eval_world --teacher runs/demo/teacher --student runs/demo/student-moe

(the demo's outputs; a dump made before the teacher's tokenizer was kept gets it added).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def _steps_per_s(history: list[dict], skip: int = 5) -> float:
    rows = history[skip:]
    return len(rows) / (rows[-1]["elapsed_s"] - history[skip - 1]["elapsed_s"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=Path, required=True)
    ap.add_argument("--world", type=Path, required=True)
    ap.add_argument("--eval-world", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--student", type=Path, required=True, help="An upcycled student with the teacher's tokenizer.")
    ap.add_argument("--vocab", type=int, default=300, help="Vocabulary size of the other BPE.")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-limit", type=int, default=400)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from pipelines.toy.other_tokenizers import with_new_bpe, with_permuted_ids
    from shared.evaluation import greedy_answers, load_eval_model, normalise, read_eval_records, score
    from shared.mllm import load_encoder
    from shared.token_alignment import save_teacher_tokenizer
    from student_train.data import student_coverage
    from student_train.train import TrainConfig, train

    torch.use_deterministic_algorithms(True)
    save_teacher_tokenizer(args.shards, load_encoder(args.teacher).tokenizer)  # older dumps lack it
    out = args.out or Path(tempfile.mkdtemp(prefix="lmod-bench-xtok-"))
    other = out / "student-other-bpe"
    if not (other / "config.json").is_file():
        with_new_bpe(args.student, other, args.vocab)
    permuted = out / "student-permuted-ids"
    if not (permuted / "config.json").is_file():
        with_permuted_ids(args.student, permuted)
    coverage = {p: student_coverage(args.shards, other, project=p) for p in ("exact", "first_token")}
    configs = Path(__file__).parents[1] / "configs"
    records = read_eval_records(args.eval_world / "eval.jsonl", args.eval_world)[: args.eval_limit]

    def answers(model_dir: Path) -> list[str]:
        return greedy_answers(load_eval_model(model_dir), load_encoder(model_dir), records, args.eval_world)

    teacher_answers = answers(args.teacher)
    rows = {"teacher": {"accuracy": score(records, teacher_answers)["accuracy"], "agreement": 1.0}}
    runs = [("sft, other BPE", other, "sft.yaml", {}),
            ("cross-tokenizer mimic", other, "mimic.yaml", {"cross_vocab": "exact"}),
            ("cross-tokenizer mimic, first_token", other, "mimic.yaml", {"cross_vocab": "first_token"}),
            ("same-tokenizer mimic", args.student, "mimic.yaml", {}),
            ("permuted ids, cross-tokenizer path", permuted, "mimic.yaml", {})]
    for name, student, yaml_name, extra in runs:
        cfg = TrainConfig.from_yaml(configs / yaml_name, steps=args.steps, batch_size=args.batch, seed=0, **extra)
        run_dir = out / name.replace(" ", "_").replace(",", "")
        history = train([args.shards], student, run_dir, cfg, image_root=args.world, progress=False)
        got = answers(run_dir)
        rows[name] = {"accuracy": score(records, got)["accuracy"],
                      "agreement": sum(normalise(a) == normalise(b) for a, b in zip(got, teacher_answers))
                      / len(records), "steps_per_s": _steps_per_s(history),
                      "tokens_per_step": sum(h["tokens"] for h in history) / len(history)}
    ratio = rows["permuted ids, cross-tokenizer path"]["steps_per_s"] / rows["same-tokenizer mimic"]["steps_per_s"]
    print(json.dumps({"coverage": coverage, "rows": rows, "cross_over_same_throughput": ratio}, indent=2))
    print("\n| run | held-out accuracy | agreement with teacher | steps/s |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['accuracy']:.3f} | {r['agreement']:.3f} | {r.get('steps_per_s', float('nan')):.2f} |")
    print(f"\ncross-tokenizer path / same-tokenizer path, same model and tokens (steps/s): {ratio:.2f} (goal >= 0.8); "
          f"paired positions {coverage['exact']['paired_positions']:.1%}, mapped top-k mass "
          f"{coverage['exact']['mapped_topk_mass']:.1%} (exact), {coverage['first_token']['mapped_topk_mass']:.1%} "
          "(first_token)")


if __name__ == "__main__":
    main()
