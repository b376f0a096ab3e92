"""The transformers teacher backend at a real vocabulary and prompt length, side by side in one run
(each case in a fresh process): the tiny teacher with its vocabulary padded to 151,936 (Qwen's),
prompts of `--prompt` tokens (the image tokens of a real teacher: 600-2,900 per sample) of which
`--response` are scored.

    python pipelines/benchmarks/bench_teacher_head.py [--vocab 151936] [--prompt 2048] [--response 64] [--batch 4]

  bare     the model's body only (the prefill a dump cannot avoid)
  before   what the hf backend did before: `model(**inputs).logits` for every position, then
           log_softmax + top-k at the scored ones
  after    what it does now (`teacher_dump/backends.py:HFBackend`): the body, then the head at the
           scored positions only, top-k of raw logits and one logsumexp per position

Prints tokens/s of each (scored positions per second; bare: the same batches), after/bare and
before/bare, the peak RSS above the loaded model, and the largest difference between the top-k
log-probs the two paths store. With --vllm, the same for vLLM on the padded checkpoint: bare,
prompt_logprobs (--vllm-scoring logprobs) and hidden states + our head (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _measure(teacher: str, mode: str, vocab_rows: int, prompt: int, response: int, batch: int, k: int,
             repeat: int) -> dict:

    import torch

    from shared.mllm import FinalHidden
    from teacher_dump.backends import HFBackend, ScoreRequest, float32_head

    torch.manual_seed(0)
    torch.set_num_threads(2)
    backend = HFBackend(teacher, batch_size=batch)
    vocab = backend.model.config.text_config.vocab_size
    body_params = sum(p.numel() for n, p in backend.model.named_parameters()
                      if "embed_tokens" not in n and "lm_head" not in n and "vision" not in n)
    vocab_rows = vocab_rows or vocab
    backend.model.resize_token_embeddings(vocab_rows, mean_resizing=False)
    backend.body = FinalHidden.of(backend.model)  # resizing replaced the output projection module
    backend.head = float32_head(backend.body.head)  # and the backend's float32 copy of it
    gen = torch.Generator().manual_seed(0)
    tokens = min(vocab, len(backend.encoder.tokenizer))  # ids a tokenizer produces
    requests = [ScoreRequest(ids=torch.randint(0, tokens, (prompt,), generator=gen).tolist(), prompt_ids=[],
                             positions=list(range(prompt - response, prompt)), images=[], features=[], top_k=k)
                for _ in range(batch)]
    inputs = {"input_ids": torch.tensor([r.ids for r in requests])}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])

    @torch.no_grad()
    def before() -> list:
        logits = backend.model(**inputs).logits
        out = []
        for row, req in enumerate(requests):
            logp = torch.log_softmax(logits[row, torch.tensor(req.positions) - 1].float(), -1)
            out.append(torch.topk(logp, k, -1).values.numpy())
        return out

    if mode.startswith("vllm"):
        return _measure_vllm(teacher, mode, requests, k, repeat, batch * response)
    body = FinalHidden.of(backend.model) if mode == "bare" else None
    run = {"bare": lambda: torch.no_grad()(body)(backend.model, inputs), "before": before,
           "after": lambda: [r.topk_logprobs for r in backend.score(requests)]}[mode]
    hidden = backend.model.config.text_config.hidden_size
    head_share = hidden * vocab_rows / (hidden * vocab_rows + body_params)  # of a position's forward FLOPs
    return {**_timed(run, repeat, batch * response, with_ids=mode != "bare"), "head_share": head_share}


def _timed(run, repeat: int, scored: int, with_ids: bool) -> dict:
    """Best of `repeat` calls, scored positions per second, the peak RSS above the start, and the
    top-k log-probs of the last call (to compare the modes)."""
    import resource

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = run()
        best = min(best, time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": best, "tokens_per_s": scored / best, "extra_mb": (peak - base) / 1024,
            "topk": [a.tolist() for a in out] if with_ids else None}


def _measure_vllm(teacher: str, mode: str, requests: list, k: int, repeat: int, scored: int) -> dict:
    """vLLM on the padded checkpoint (saved by the parent): bare = one prefill and one sampled
    token; logprobs = prompt_logprobs over every position; hidden = the default path."""
    from vllm import SamplingParams

    from teacher_dump.backends import VLLMBackend

    for r in requests:
        r.prompt_ids = r.ids
    scoring = "hidden" if mode == "vllm-hidden" else "logprobs"
    engine = VLLMBackend(teacher, max_model_len=len(requests[0].ids) + 8, max_logprobs=k, scoring=scoring)
    if mode == "vllm-bare":
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        prompts = [{"prompt_token_ids": r.ids} for r in requests]

        def run():
            return engine.llm.generate(prompts, params, use_tqdm=False)
    else:
        def run():
            return [r.topk_logprobs for r in engine.score(requests)]
    run()  # warm-up
    return {**_timed(run, repeat, scored, with_ids=mode != "vllm-bare"), "head_share": 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--vllm", action="store_true", help="also vLLM (bare, prompt_logprobs, hidden) at the padded size")
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
            print(f"top-k log-probs, before vs after: max |diff| {_max_diff(got['before'], got['after']):.1e}")
        if args.vllm:
            _vllm_table(Path(tmp), args)


def _vllm_table(tmp: Path, args) -> None:
    """The padded checkpoint on disk (vLLM loads directories), then bare / logprobs / hidden."""
    import shutil

    from transformers import AutoModelForImageTextToText

    padded = tmp / "padded"
    model = AutoModelForImageTextToText.from_pretrained(str(tmp / "t"))
    model.resize_token_embeddings(args.vocab, mean_resizing=False)
    model.save_pretrained(str(padded))
    for f in (tmp / "t").iterdir():
        if not (padded / f.name).exists():
            shutil.copy(f, padded / f.name)
    got = {}
    for mode in ("vllm-bare", "vllm-logprobs", "vllm-hidden"):
        cmd = [sys.executable, __file__, "--vocab", "0", "--prompt", str(args.prompt), "--response",
               str(args.response), "--batch", str(args.batch), "--k", str(args.k), "--repeat", str(args.repeat),
               "--child", str(padded), mode]
        env = {**os.environ, "VLLM_LOGGING_STREAM": "ext://sys.stderr", "VLLM_LOGGING_LEVEL": "WARNING"}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode:
            got[mode] = None
            print(f"{mode}: failed: {res.stderr.strip().splitlines()[-1][:200]}")
            continue
        got[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    bare = got["vllm-bare"]["tokens_per_s"] if got.get("vllm-bare") else float("nan")
    print(f"\nvLLM teacher, V={args.vocab} (padded checkpoint), {args.batch} rows x {args.prompt} prompt tokens, "
          f"{args.response} scored per row, k={args.k}")
    print(f"{'mode':>14} {'scored tok/s':>13} {'/ bare':>7} {'peak MB':>8}  (the driver: the engine has its own)")
    for mode, g in got.items():
        if g:
            print(f"{mode:>14} {g['tokens_per_s']:>13.0f} {g['tokens_per_s'] / bare:>7.2f} {g['extra_mb']:>8.0f}")
    if got.get("vllm-logprobs") and got.get("vllm-hidden"):
        diff = _max_diff(got["vllm-logprobs"], got["vllm-hidden"])
        print(f"top-k log-probs, logprobs vs hidden: max |diff| {diff:.1e}")


def _max_diff(a: dict, b: dict) -> float:
    import numpy as np

    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(a["topk"], b["topk"]))


if __name__ == "__main__":
    main()
