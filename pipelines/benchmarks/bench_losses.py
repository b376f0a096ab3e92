"""Peak memory of the mimic loss (KL with the rest bucket + CE, forward and backward) at a real
vocabulary, whole-batch vs chunked, measured side by side in one run (each in a fresh process):

    python pipelines/benchmarks/bench_losses.py [--vocab 151936] [--tokens 1024 2048 4096] [--chunk 256]

"whole" is the computation before chunking (sparse_kl and cross_entropy over all [N, V] logits at
once); "chunked" is what training runs now (`mimic_token_losses`: both terms in one chunked pass). The student's
logits [N, V] (float32, with their gradient) exist in both; the figure is the peak RSS above the
process's RSS once they are allocated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _measure(mode: str, vocab: int, tokens: int, chunk: int, k: int) -> dict:
    import resource

    import torch

    from student_train.losses import mimic_token_losses, sparse_kl

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, requires_grad=True)
    logits.grad = torch.zeros_like(logits)  # the gradient buffer exists in both modes
    teacher = torch.randn(tokens, 4 * k).log_softmax(-1)
    topk = teacher.topk(k, -1)
    ids, lps = topk.indices.contiguous(), topk.values.contiguous()
    rest = (1 - lps.double().exp().sum(-1)).clamp(min=0).float()
    targets = ids[:, 0].clone()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "whole":
        loss = (sparse_kl(logits, ids, lps, tail="rest", rest_mass=rest)
                + torch.nn.functional.cross_entropy(logits, targets, reduction="none")).sum()
    else:
        loss = mimic_token_losses(logits, ids, lps, rest, targets, 1.0, 1.0, tail="rest", chunk=chunk)[:, 0].sum()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"extra_mb": (peak - base) / 1024, "loss": float(loss),
            "grad_sum": float(logits.grad.double().abs().sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child[0], args.vocab, int(args.child[1]), args.chunk, args.k)))
        return
    print(f"peak memory above the logits and their gradient, V={args.vocab}, k={args.k}, chunk={args.chunk}")
    print(f"{'tokens':>7} {'[N,V] f32 MB':>13} {'whole MB':>9} {'chunked MB':>11} {'ratio':>6}  same loss and grad")
    for n in args.tokens:
        got = {}
        for mode in ("whole", "chunked"):
            cmd = [sys.executable, __file__, "--vocab", str(args.vocab), "--chunk", str(args.chunk), "--k", str(args.k),
                   "--child", mode, str(n)]
            got[mode] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        w, c = got["whole"], got["chunked"]
        same = all(abs(w[key] - c[key]) <= 1e-4 * abs(w[key]) for key in ("loss", "grad_sum"))
        print(f"{n:>7} {n * args.vocab * 4 / 2**20:>13.0f} {w['extra_mb']:>9.0f} {c['extra_mb']:>11.0f} "
              f"{w['extra_mb'] / max(c['extra_mb'], 1):>6.1f}  {same}")


if __name__ == "__main__":
    main()
