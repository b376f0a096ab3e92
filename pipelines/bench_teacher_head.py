"""The transformers teacher backend at a real vocabulary and prompt length, side by side in one run
(each case in a fresh process): the tiny teacher with its vocabulary padded to 151,936 (Qwen's),
prompts of `--prompt` tokens (the image tokens of a real teacher: 600-2,900 per sample) of which
`--response` are scored.

    python pipelines/bench_teacher_head.py [--vocab 151936] [--prompt 2048] [--response 64] [--batch 4]

  bare     the model's body only (the prefill a dump cannot avoid)
  before   what the hf backend did before: `model(**inputs).logits` for every position, then
           log_softmax + top-k at the scored ones
  after    what it does now (`teacher_dump/backends.py:HFBackend`): the body, then the head at the
           scored positions only, top-k of raw logits and one logsumexp per position

Prints tokens/s of each (scored positions per second; bare: the same batches), after/bare and
before/bare, and the peak RSS above the loaded model; checks that before and after store the
same top-k.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _measure(teacher: str, mode: str, vocab_rows: int, prompt: int, response: int, batch: int, k: int,
             repeat: int) -> dict:
    import resource

    import torch

    from shared.mllm import FinalHidden
    from teacher_dump.backends import HFBackend, ScoreRequest

    torch.manual_seed(0)
    torch.set_num_threads(2)
    backend = HFBackend(teacher, batch_size=batch)
    vocab = backend.model.config.text_config.vocab_size
    body_params = sum(p.numel() for n, p in backend.model.named_parameters()
                      if "embed_tokens" not in n and "lm_head" not in n and "vision" not in n)
    vocab_rows = vocab_rows or vocab
    backend.model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    backend.body = FinalHidden(backend.model)  # resizing replaced the output projection module
    gen = torch.Generator().manual_seed(0)
    requests = [ScoreRequest(ids=torch.randint(0, vocab, (prompt,), generator=gen).tolist(), prompt_ids=[],
                             positions=list(range(prompt - response, prompt)), image=None, features=None, top_k=k)
                for _ in range(batch)]
    inputs = {"input_ids": torch.tensor([r.ids for r in requests])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])

    @torch.no_grad()
    def before() -> list:
        logits = backend.model(**inputs).logits
        out = []
        for row, req in enumerate(requests):
            logp = torch.log_softmax(logits[row, torch.tensor(req.positions) - 1].float(), -1)
            out.append(torch.topk(logp, k, -1).indices.numpy())
        return out

    body = FinalHidden(backend.model) if mode == "bare" else None
    run = {"bare": lambda: torch.no_grad()(body)(backend.model, inputs), "before": before,
           "after": lambda: [r.topk_ids for r in backend.score(requests)]}[mode]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = [a.tolist() for a in out] if mode != "bare" else None
    hidden = backend.model.config.text_config.hidden_size
    head_share = hidden * vocab_rows / (hidden * vocab_rows + body_params)  # of a position's forward FLOPs
    return {"seconds": best, "tokens_per_s": batch * response / best, "extra_mb": (peak - base) / 1024, "ids": ids,
            "head_share": head_share}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        teacher, mode = args.child
        print(json.dumps(_measure(teacher, mode, args.vocab, args.prompt, args.response, args.batch, args.k,
                                  args.repeat)))
        return
    from pipelines.toy.tiny_teacher import TinyMLLMConfig, make_tiny_teacher
    from pipelines.toy.world import make_world

    with tempfile.TemporaryDirectory() as tmp:
        make_world(Path(tmp) / "w", seed=0, n_mimic=4, n_pref=0, n_eval=0)
        cfg = TinyMLLMConfig()
        cfg.max_positions = max(cfg.max_positions, args.prompt + 8)
        make_tiny_teacher(Path(tmp) / "w", Path(tmp) / "t", steps=0, config=cfg)
        for vocab in (0, args.vocab):  # the teacher's own vocabulary (the head's FLOP share of a 7B), then padded
            got = {}
            for mode in ("bare", "before", "after"):
                cmd = [sys.executable, __file__, "--vocab", str(vocab), "--prompt", str(args.prompt), "--response",
                       str(args.response), "--batch", str(args.batch), "--k", str(args.k), "--repeat",
                       str(args.repeat), "--child", str(Path(tmp) / "t"), mode]
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode:
                    raise SystemExit(res.stderr[-2000:])
                got[mode] = json.loads(res.stdout.strip().splitlines()[-1])
            bare = got["bare"]["tokens_per_s"]
            print(f"\nhf teacher, V={vocab or 'own'}, output head {got['bare']['head_share']:.0%} of a position's "
                  f"forward FLOPs, {args.batch} rows x {args.prompt} prompt tokens, {args.response} scored per row, "
                  f"k={args.k}")
            print(f"{'mode':>7} {'scored tok/s':>13} {'/ bare':>7} {'peak MB':>8}")
            for mode in ("bare", "before", "after"):
                g = got[mode]
                print(f"{mode:>7} {g['tokens_per_s']:>13.0f} {g['tokens_per_s'] / bare:>7.2f} {g['extra_mb']:>8.0f}")
            print(f"same top-k ids before and after: {got['before']['ids'] == got['after']['ids']}")


if __name__ == "__main__":
    main()
