"""The memory plan (`lmod train --dry-run`) against measured memory, side by side in one run.

For two micro-batch sizes, with and without activation checkpointing, one mimic step of a student
runs in a fresh process (text rows of `--length` tokens, the trainer's own objective, the config's
trainable parts and dtype) and its peak RSS above the loaded model and batch is measured (Linux:
VmHWM, reset after loading). The plan's predicted difference between the two sizes (activations
only: everything else is the same) is printed beside the measured one, with their ratio (the plan
is held to within 30%).

    python pipelines/benchmarks/bench_memory_plan.py [--student DIR] [--rows 4 16] [--length 512]
        [--dtype float32|bfloat16] [--train experts router]

Without --student, the tiny world's MoE student is built in a temporary directory.

    python pipelines/benchmarks/bench_memory_plan.py --recipe [--ranks 8]

plans (no measurement of steps) the GPU recipes (pipelines/recipes/*_gpu.yaml) for a student of
Qwen3-VL-2B's shape upcycled as the recipe does (28 layers, every other one 4 experts top-2,
V = 151,936; config only, nothing downloaded) at 1,024 and 2,048 tokens per row, with and without
activation checkpointing: the per-token figures and per-rank totals of docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, sys
from contextlib import nullcontext
import torch
from shared.mllm import FinalHidden
from shared.models import load_model
from student_train.config import TrainConfig
from student_train.data import MimicBatch
from student_train.objectives import mimic_terms
from student_train.parts import apply_trainable
from student_train.precision import bf16_weights
student, rows, length, cfg_json = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = TrainConfig(**json.loads(cfg_json))
torch.manual_seed(0)
torch.set_num_threads(2)
model = load_model(student, torch.float32)
model.train()
apply_trainable(model, cfg.train, "student")
if cfg.activation_checkpointing:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
vocab = model.get_output_embeddings().weight.shape[0]
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, vocab, (rows, length), generator=gen)
inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
response, k = 32, 8
cols = torch.arange(length - response - 1, length - 1).repeat(rows)
row_index = torch.arange(rows).repeat_interleave(response)
teacher = torch.randn(row_index.numel(), 4 * k, generator=gen).log_softmax(-1).topk(k, -1)
batch = MimicBatch(inputs, row_index, cols, teacher.indices % vocab, teacher.values.contiguous(),
                   (1 - teacher.values.double().exp().sum(-1)).clamp(min=0).float())
body = FinalHidden.of(model)
bf16 = cfg.dtype == "bfloat16"
weights = bf16_weights(model) if bf16 else nullcontext()
autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
# This process's own peak (VmHWM of its address space), reset to now: getrusage's ru_maxrss keeps
# the peak of the address space exec replaced, i.e. the parent's at fork (a test runner's GBs).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status_kib("VmRSS")
with weights:
    with autocast:
        loss = mimic_terms(model, batch, cfg, body, vocab)["objective"]
    loss.backward()
peak = status_kib("VmHWM")
print(json.dumps({"extra_bytes": (peak - base) * 1024, "loss": float(loss)}))
"""


def measure_step(student: Path, rows: int, length: int, cfg_fields: dict) -> int:
    """Peak RSS (bytes) of one mimic step above the loaded model and batch, in a fresh process."""
    # Large blocks straight from mmap: freed memory leaves RSS at once, so the peak RSS is the peak
    # of live tensors (as a GPU's peak allocated memory is), not of the allocator's free lists.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", _CHILD, str(student), str(rows), str(length), json.dumps(cfg_fields)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[2], env=env)
    if res.returncode != 0:
        raise SystemExit(f"step of {rows} x {length} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["extra_bytes"]


def compare(student: Path, rows: tuple[int, int], length: int, cfg_fields: dict) -> dict:
    """Predicted and measured memory differences between micro-batches of rows[0] and rows[1]."""
    from student_train.config import TrainConfig
    from student_train.memory_plan import plan_memory

    measured_plan = None
    predicted, measured = [], []
    for n in rows:
        plan, measured_plan = plan_memory(student, TrainConfig(**{**cfg_fields, "batch_size": n}), 1, length,
                                          measured_plan)
        predicted.append(plan.total)
        measured.append(measure_step(student, n, length, {**cfg_fields, "batch_size": n}))
    d_pred, d_meas = predicted[1] - predicted[0], measured[1] - measured[0]
    return {"rows": list(rows), "length": length, "predicted_total": predicted, "measured_step": measured,
            "predicted_difference": d_pred, "measured_difference": d_meas,
            "ratio": d_pred / d_meas if d_meas else float("inf")}


def qwen3_vl_2b_moe(out: Path) -> Path:
    """A config-only student directory of Qwen3-VL-2B's text shape, upcycled every other layer."""
    from transformers import AutoConfig

    text = {"vocab_size": 151_936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 6144,
            "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
            "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(0, 28, 2)), "tie_word_embeddings": True,
            "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20]}}
    AutoConfig.for_model("qwen3_vl_moe", text_config=text, tie_word_embeddings=True).save_pretrained(out)
    return out


def recipe_plans(ranks: int) -> None:
    import yaml

    from student_train.config import TrainConfig
    from student_train.memory_plan import GIB, plan_memory

    root = Path(__file__).parents[1] / "recipes"
    with tempfile.TemporaryDirectory() as tmp:
        student = qwen3_vl_2b_moe(Path(tmp))
        measured = None
        print(f"per-rank plan, {ranks} ranks, Qwen3-VL-2B-shaped MoE student (GiB)")
        print(f"{'recipe':>10} {'tokens/row':>10} {'ckpt':>5} {'rows/rank':>9} {'weights':>8} {'grads':>6} "
              f"{'adam':>6} {'acts':>7} {'total':>7}")
        for name in ("mimic_gpu", "pref_gpu"):
            cfg = yaml.safe_load((root / f"{name}.yaml").read_text())
            per_example = 2 if cfg["stage"] == "pref" else 1
            for tokens in (1024, 2048):
                for ckpt in (False, True):
                    plan, measured = plan_memory(student, TrainConfig(**{**cfg, "activation_checkpointing": ckpt}),
                                                 ranks, tokens * per_example, measured)
                    d = plan.detail
                    print(f"{name:>10} {tokens:>10} {str(ckpt):>5} {d['rows_per_rank']:>9} "
                          f"{plan.weights / GIB:>8.1f} {plan.grads / GIB:>6.1f} {plan.optimizer / GIB:>6.1f} "
                          f"{plan.activations / GIB:>7.1f} {plan.total / GIB:>7.1f}")
        print("bytes per token per layer (saved for backward / peak of its forward+backward):")
        for key, cost in measured.items():
            print(f"  {key}: {cost.saved / 1024:.0f} KiB / {cost.peak / 1024:.0f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--recipe", action="store_true")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--student", type=Path)
    ap.add_argument("--rows", type=int, nargs=2, default=[4, 16])
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--train", nargs="+", default=["experts", "router"])
    args = ap.parse_args()
    from pipelines.benchmarks.bench_step_memory import build_student

    if args.recipe:
        recipe_plans(args.ranks)
        return
    with tempfile.TemporaryDirectory() as tmp:
        student = args.student or build_student(Path(tmp))
        print(f"plan vs measured, one mimic step, rows {args.rows[0]} -> {args.rows[1]} of {args.length} tokens, "
              f"{args.dtype}, train {args.train}")
        print(f"{'checkpointing':>14} {'predicted MB':>13} {'measured MB':>12} {'ratio':>6}")
        for checkpointing in (False, True):
            got = compare(student, tuple(args.rows), args.length,
                          {"dtype": args.dtype, "train": args.train, "activation_checkpointing": checkpointing})
            print(f"{str(checkpointing):>14} {got['predicted_difference'] / 2**20:>13.1f} "
                  f"{got['measured_difference'] / 2**20:>12.1f} {got['ratio']:>6.2f}")


if __name__ == "__main__":
    main()
