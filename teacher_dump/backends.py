"""Teacher backends behind one interface: score token sequences, return per-position log-probs.

Engine construction lives here and only here; workers are thin. Both backends return, for every
scored position p, the teacher's log-prob of ids[p] given ids[:p] and the top-k (id, log-prob)
of that same next-token distribution (log-softmax of the raw logits, no temperature).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from shared.mllm import ImageFeatures, batch_inputs, load_encoder


@dataclass
class ScoreRequest:
    ids: list[int]  # expanded token ids (image tokens in place)
    prompt_ids: list[int]  # unexpanded ids (one placeholder per image), what vLLM is given
    positions: list[int]  # indices into `ids` to score (response tokens), all >= 1
    image: Image.Image | None  # vLLM processes the image itself
    features: ImageFeatures | None  # the processor's tensors for it (hf backend)
    top_k: int  # 0: only the target's log-prob
    sample: int = 0  # RS-KD: draws per position from the full distribution (hf backend only)
    sample_seed: int = 0  # the request's own seed: same request, same draws, whatever the batching


@dataclass
class ScoreResult:
    target_logprobs: np.ndarray  # [P] float32
    topk_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))  # [P, k]
    topk_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [P, k]
    sampled_ids: list[np.ndarray] = field(default_factory=list)  # [P] of unique ids, ascending
    sampled_counts: list[np.ndarray] = field(default_factory=list)  # [P] of their counts (sum: sample)


def sample_counts(logprobs: torch.Tensor, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RS-KD (Anshumann et al., 2025): n draws per row from the distribution exp(logprobs) [P, V]
    at temperature 1, with replacement; per row the unique ids (ascending) and their counts. Drawn
    in float64 on the CPU from a generator of `seed`: the same inputs give the same draws anywhere."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    probs = logprobs.detach().double().cpu().exp()
    draws = torch.multinomial(probs, n, replacement=True, generator=gen).numpy()
    ids, counts = [], []
    for row in draws:
        u, c = np.unique(row, return_counts=True)
        ids.append(u.astype(np.int32))
        counts.append(c.astype(np.uint16))
    return ids, counts


class TeacherBackend(Protocol):
    name: str

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]: ...


class HFBackend:
    """transformers: the model's body once per batch (right padding), then the output projection at
    the scored positions only, `chunk` positions at a time: top-k of the raw logits and one
    logsumexp per position, in float32 whatever the model dtype. No [batch, length, V] logits and
    no full log-softmax exist (image and prompt positions are never projected)."""

    name = "hf"

    def __init__(self, model_dir: str | Path, dtype: str = "float32", batch_size: int = 32, device: str = "auto",
                 chunk: int = 256):
        from transformers import AutoModelForImageTextToText

        from shared.mllm import FinalHidden

        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.model = AutoModelForImageTextToText.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype)
        ).to(self.device).eval()
        self.batch_size = batch_size
        self.chunk = chunk
        self.encoder = load_encoder(model_dir)
        self.body = FinalHidden(self.model)

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        results: list[ScoreResult] = []
        head = self.body.head
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            # Text-only rows simply contribute no image: models fill image tokens in order.
            inputs = batch_inputs(self.encoder, [r.ids for r in chunk], [r.features for r in chunk], self.device,
                                  self.model.dtype)
            hidden = self.body(self.model, inputs)
            for row, req in enumerate(chunk):
                pos = torch.tensor(req.positions, device=hidden.device) - 1  # the state at p-1 predicts ids[p]
                results.append(self._pick(hidden[row, pos], head, req))
        return results

    def _pick(self, hidden: torch.Tensor, head: torch.nn.Module, req: ScoreRequest) -> ScoreResult:
        targets = torch.tensor([req.ids[p] for p in req.positions], device=hidden.device)
        target_lp, top_ids, top_lp, full = [], [], [], []
        for s in range(0, hidden.shape[0], self.chunk):
            logits = head(hidden[s : s + self.chunk]).float()  # [C, V]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            target_lp.append(logits.gather(1, targets[s : s + self.chunk, None])[:, 0] - lse[:, 0])
            if req.top_k > 0:
                top = torch.topk(logits, req.top_k, dim=-1)
                top_ids.append(top.indices)
                top_lp.append(top.values - lse)
            if req.sample:
                full.append((logits - lse).cpu())  # RS-KD draws need the whole distribution
        target = torch.cat(target_lp).cpu().numpy().astype(np.float32)
        if req.top_k <= 0:
            return ScoreResult(target)
        sampled = sample_counts(torch.cat(full), req.sample, req.sample_seed) if req.sample else ([], [])
        return ScoreResult(
            target,
            torch.cat(top_ids).cpu().numpy().astype(np.int32),
            torch.cat(top_lp).cpu().numpy().astype(np.float32),
            *sampled,
        )


class VLLMBackend:
    """vLLM prompt log-probs: `max_tokens=1`, `prompt_logprobs=k`, flat lists, no detokenisation
    (vLLM's per-entry Python objects and decoded strings otherwise dominate the dump's cost)."""

    name = "vllm"

    def __init__(
        self, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 512, max_logprobs: int = 64,
        gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1,
    ):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            enforce_eager=not on_gpu,
            # On the CPU backend this is the share of *host* memory for the KV cache.
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.2),
            limit_mm_per_prompt={"image": 1},
            tensor_parallel_size=tensor_parallel_size,
            # Cached prefixes from earlier shards would change numerics: shards must not depend
            # on what ran before them (resume must give byte-identical files).
            enable_prefix_caching=False,
            seed=0,
        )

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams

        prompts = []
        params = []
        for r in requests:
            prompt: dict = {"prompt_token_ids": r.prompt_ids}
            if r.image is not None:
                prompt["multi_modal_data"] = {"image": r.image}
            prompts.append(prompt)
            params.append(SamplingParams(
                max_tokens=1, temperature=0.0, prompt_logprobs=r.top_k, flat_logprobs=True, detokenize=False,
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._pick(out, req) for out, req in zip(outputs, requests)]

    @staticmethod
    def _pick(out, req: ScoreRequest) -> ScoreResult:
        if list(out.prompt_token_ids) != req.ids:
            raise RuntimeError(
                "vLLM expanded the prompt differently from the processor "
                f"({len(out.prompt_token_ids)} vs {len(req.ids)} tokens); check the model's processor config"
            )
        flat = out.prompt_logprobs
        k = req.top_k
        # Per position: the actual prompt token first, then the top-k in rank order. Gathered with
        # numpy in one go: a Python loop over positions cost ~20% of the dump's throughput.
        pos = np.asarray(req.positions)
        starts = np.asarray(flat.start_indices)[pos]
        token_ids = np.asarray(flat.token_ids, dtype=np.int64)
        logprobs = np.asarray(flat.logprobs, dtype=np.float32)
        if np.any(np.asarray(flat.end_indices)[pos] - starts != k + 1) or np.any(
            token_ids[starts] != np.asarray(req.ids)[pos]
        ):
            raise RuntimeError("unexpected vLLM prompt_logprobs layout (target first, then top-k)")
        idx = starts[:, None] + np.arange(1, k + 1)
        target = logprobs[starts]
        if k == 0:
            return ScoreResult(target)
        return ScoreResult(target, token_ids[idx].astype(np.int32), logprobs[idx])


def make_backend(name: str, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 512,
                 max_top_k: int = 64, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None) -> TeacherBackend:
    """The one place engines are built: `hf` (one device) or `vllm` (tensor-parallel over GPUs)."""
    if name == "hf":
        return HFBackend(model_dir, dtype=dtype)
    if name == "vllm":
        return VLLMBackend(model_dir, dtype=dtype, max_model_len=max_model_len, max_logprobs=max(max_top_k, 1),
                           gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size)
    raise ValueError(f"unknown backend {name!r}; use 'vllm' or 'hf'")
