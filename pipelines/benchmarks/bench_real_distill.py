"""A real distillation, measured: SmolLM2-135M-Instruct teaches students cut from its own first
layers, on questions made from the standard library's docstrings (training and held-out modules
apart), answered by the teacher itself (`lmod generate`, greedy). Side by side, same start, data,
steps and seed: SFT on the teacher's answers, mimic (top-k + rest), RS-KD (sampled draws), and a
dense vs an MoE student of equal active parameters (4 experts, top-1, upcycled from the same cut).
Held-out: KL(teacher || student) per response token and agreement with the teacher's greedy next
token, on the held-out modules' questions.

    python pipelines/benchmarks/bench_real_distill.py [--layers 4] [--train 272] [--held 96] [--steps 200]

Sized for this 2-core CPU (under an hour with the defaults); prints its table in Markdown.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4, help="text layers the students keep of the teacher's 30")
    ap.add_argument("--train", type=int, default=272, help="training questions (at most 272)")
    ap.add_argument("--held", type=int, default=96, help="held-out questions (at most 147)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--draws", type=int, default=64, help="RS-KD draws per position")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--backend", default="vllm", help="generation and dump backend: vllm | hf")
    args = ap.parse_args()

    from pipelines.real.docstrings import HELD_OUT_MODULES, TRAIN_MODULES, write_questions
    from pipelines.real.smollm2 import teacher_dir
    from shared.shards import dump_info
    from student_train.evaluate import held_out_agreement
    from student_train.moe import first_layers, upcycle
    from student_train.train import TrainConfig, train
    from teacher_dump.run import DumpConfig, dump_teacher

    tmp = args.out or Path(tempfile.mkdtemp(prefix="lmod-bench-real-"))
    tmp.mkdir(parents=True, exist_ok=True)
    teacher = teacher_dir()
    clock: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        clock[name] = time.perf_counter() - t0
        print(f"{name}: {clock[name]:.0f} s", flush=True)
        return result

    answers = {}
    for split, modules, n in (("train", TRAIN_MODULES, args.train), ("held", HELD_OUT_MODULES, args.held)):
        questions = write_questions(tmp / f"{split}_questions.jsonl", modules, n)
        answers[split] = tmp / f"{split}_answers.jsonl"
        # its own process: a second vLLM engine in this one would find the first one's memory still held
        timed(f"generate {split}", subprocess.run, [
            sys.executable, "-m", "pipelines.cli", "generate", "--model", str(teacher), "--data", str(questions),
            "--out", str(answers[split]), "--backend", args.backend, "--max-new-tokens", str(args.max_new_tokens),
            "--max-model-len", "512"], check=True)

    def run_dump(out: Path, data: Path, **kw) -> Path:
        if not (out / "manifest.json").is_file():
            timed(f"dump {out.name}", dump_teacher, DumpConfig(
                model=teacher, out=out, mimic_data=data, shards=2, backend=args.backend, progress=False,
                max_model_len=512, skip_invalid=True, **kw))
        return out

    train_dump = run_dump(tmp / "dump_train", answers["train"], top_k=args.top_k, sample=args.draws)
    held_dump = run_dump(tmp / "dump_held", answers["held"], top_k=args.top_k, encoding="f32")
    info = dump_info(train_dump)["mimic"]

    cut = tmp / "cut"
    if not (cut / "config.json").is_file():
        facts = first_layers(teacher, cut, args.layers)
        print(json.dumps(facts))
    moe = tmp / "cut_moe"
    if not (moe / "config.json").is_file():
        upcycle(cut, moe, num_experts=4, top_k=1, moe_layers="all")  # top-1 of 4 copies: the dense model's compute

    common = {"stage": "mimic", "steps": args.steps, "batch_size": args.batch, "lr": args.lr, "warmup": 10,
              "train": ["all"], "loader_workers": 1, "log_every": 10**9, "seed": 0}
    runs = {
        "SFT on the teacher's answers (CE only)": (cut, {"kd_weight": 0.0, "ce_weight": 1.0}),
        f"mimic, top-{args.top_k} + rest": (cut, {"kd_tail": "rest"}),
        f"RS-KD, {args.draws} draws": (cut, {"kd": "sampled"}),
        f"MoE (4 experts, top-1) mimic, top-{args.top_k} + rest": (moe, {"kd_tail": "rest", "aux_loss_coef": 0.01}),
    }
    rows = [("teacher's first layers, untrained", held_out_agreement(cut, [held_dump], None), None)]
    for i, (name, (start, extra)) in enumerate(runs.items()):
        out = tmp / f"student{i}"
        if not (out / "config.json").is_file():
            t0 = time.perf_counter()
            train([train_dump], start, out, TrainConfig(**common, **extra), progress=False)
            clock[name] = time.perf_counter() - t0
        rows.append((name, held_out_agreement(out, [held_dump], None), clock.get(name)))
        print(name, rows[-1][1], flush=True)

    print(f"\nteacher: SmolLM2-135M-Instruct; students: its first {args.layers} of 30 layers; train {args.train} / "
          f"held-out {args.held} questions; {args.steps} steps of {args.batch}; train dump "
          f"{info['tokens']} response tokens, {info['bytes_per_token']} B/token (top-{args.top_k} u8 + "
          f"{args.draws} draws)\n")
    print("| student | held-out KL(teacher \\|\\| student) per token | agreement with the teacher's next token | "
          "train s |")
    print("|---|---:|---:|---:|")
    for name, metrics, seconds in rows:
        print(f"| {name} | {metrics['kl_to_teacher']:.3f} | {metrics['agreement_with_teacher']:.3f} | "
              f"{'' if seconds is None else f'{seconds:.0f}'} |")
    print("\n" + json.dumps({k: round(v, 1) for k, v in clock.items()}))


if __name__ == "__main__":
    main()
