"""Peak memory of one mimic training step of the tiny MoE student with its vocabulary padded to a
real size (151,936, Qwen2/3's), side by side in one run, each case in a fresh process:

    python pipelines/benchmarks/bench_step_memory.py [--vocab 151936] [--shapes 1x128 48x128 1x4096] [--response 64]

"logits" is the step as it was before the fused head: `model(**inputs).logits` ([rows, length, V]
for every position), the response positions gathered, then the chunked loss. "fused" is the step
training runs now (`train.mimic_terms`): the model's body, hidden states gathered at the response
positions, the output projection applied chunk by chunk inside the loss. Same batch, same loss
(checked: equal loss and gradient norm). The figure is the peak RSS above the process's RSS once the
model and the batch are in memory. Rows are text (`--response` response tokens at the end of each
row, the rest prompt): the vision tower is not what grows with V.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def build_student(root: Path) -> Path:
    from pipelines.toy.tiny_teacher import make_tiny_teacher
    from pipelines.toy.world import make_world
    from student_train.moe import make_dense_student, upcycle

    make_world(root / "world", seed=0, n_mimic=4, n_pref=0, n_eval=0)
    make_tiny_teacher(root / "world", root / "teacher", steps=0)
    make_dense_student(root / "teacher", root / "dense")
    upcycle(root / "dense", root / "moe")
    return root / "moe"


def _measure(student: str, mode: str, rows: int, length: int, response: int, vocab_rows: int, k: int,
             chunk: int) -> dict:
    import resource

    import torch
    from transformers import AutoModelForImageTextToText

    from shared.mllm import FinalHidden
    from student_train.data import MimicBatch
    from student_train.losses import mimic_token_losses
    from student_train.train import TrainConfig, mimic_terms

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = AutoModelForImageTextToText.from_pretrained(student, dtype=torch.float32)
    vocab = model.config.text_config.vocab_size  # the tokenizer's ids stay below it
    model.resize_token_embeddings(vocab_rows, mean_resizing=False)  # padded rows, as real checkpoints have
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, length), generator=gen)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    cols = torch.arange(length - response - 1, length - 1).repeat(rows)
    row_index = torch.arange(rows).repeat_interleave(response)
    n = row_index.numel()
    teacher = torch.randn(n, 4 * k, generator=gen).log_softmax(-1).topk(k, -1)
    batch = MimicBatch(inputs, row_index, cols, (teacher.indices * 7) % vocab, teacher.values.contiguous(),
                       (1 - teacher.values.double().exp().sum(-1)).clamp(min=0).float())
    cfg = TrainConfig(kd_tail="rest", ce_weight=0.5, loss_chunk=chunk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "fused":
        loss = mimic_terms(model, batch, cfg, FinalHidden.of(model), vocab)["objective"]
    else:  # the step before this change
        logits = model(**inputs).logits
        student_logits = logits[batch.rows, batch.cols, :vocab]
        targets = ids[batch.rows, batch.cols + 1]
        loss = mimic_token_losses(student_logits, batch.topk_ids, batch.topk_logprobs, batch.rest_mass, targets,
                                  cfg.kd_weight, cfg.ce_weight, tail="rest", chunk=chunk)[:, 0].sum()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None]))
    return {"extra_mb": (peak - base) / 1024, "loss": float(loss), "grad_norm": float(grad_norm)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--shapes", nargs="+", default=["1x128", "48x128", "1x4096"], help="ROWSxTOKENS per case")
    ap.add_argument("--response", type=int, default=64, help="response (scored) tokens per row")
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--modes", nargs="+", default=["logits", "fused"])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        student, mode, rows, length = args.child
        print(json.dumps(_measure(student, mode, int(rows), int(length), args.response, args.vocab, args.k,
                                  args.chunk)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        student = build_student(Path(tmp))
        print(f"peak memory of one mimic step above the loaded model, V={args.vocab} (padded), k={args.k}, "
              f"{args.response} response tokens per row, loss chunk {args.chunk}")
        print(f"{'rows x tokens':>14} " + " ".join(f"{m + ' MB':>10}" for m in args.modes) + "  same loss and grad")
        for shape in args.shapes:
            rows, length = shape.split("x")
            got = {}
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--response", str(args.response),
                       "--k", str(args.k), "--chunk", str(args.chunk), "--child", str(student), mode, rows, length]
                run = subprocess.run(cmd, capture_output=True, text=True)
                got[mode] = json.loads(run.stdout.strip().splitlines()[-1]) if run.returncode == 0 else None
            cells = " ".join(f"{got[m]['extra_mb']:>10.0f}" if got[m] else f"{'failed':>10}" for m in args.modes)
            done = [g for g in got.values() if g]
            same = len(done) > 1 and all(abs(g[key] - done[0][key]) <= 1e-4 * abs(done[0][key])
                                         for g in done for key in ("loss", "grad_norm"))
            print(f"{shape:>14} {cells}  {same if len(done) > 1 else '-'}")


if __name__ == "__main__":
    main()
