"""Teacher backends behind one interface: score token sequences, return per-position log-probs.

Engine construction lives here and only here; workers are thin. Both backends return, for every
scored position p, the teacher's log-prob of ids[p] given ids[:p] and the top-k (id, log-prob)
of that same next-token distribution (log-softmax of the raw logits, no temperature).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
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
    images: list[Image.Image]  # vLLM processes the images itself
    features: list[ImageFeatures]  # the processor's tensors for them (hf backend)
    top_k: int  # 0: only the target's log-prob
    sample: int = 0  # RS-KD: draws per position from the full distribution (both backends)
    sample_seed: int = 0  # the request's own seed: same request, same draws, whatever the batching
    counted_id: int | None = None  # ids holds image runs by length only, as this placeholder id (vLLM)


@dataclass
class ScoreResult:
    target_logprobs: np.ndarray  # [P] float32
    topk_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int32))  # [P, k]
    topk_logprobs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # [P, k]
    sampled_ids: list[np.ndarray] = field(default_factory=list)  # [P] of unique ids, ascending
    sampled_counts: list[np.ndarray] = field(default_factory=list)  # [P] of their counts (sum: sample)


class Draws:
    """RS-KD (Anshumann et al., 2025): `n` draws per position from the teacher's distribution at
    temperature 1, with replacement, kept as the unique ids (ascending) and their counts. Drawn in
    float64 on the CPU from one generator of `seed` per request, a chunk of positions at a time (no
    [P, V] copy of the request): CPU multinomial consumes its generator row by row, so the draws are
    those of one call on all positions, and the same inputs give the same draws anywhere."""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.ids: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []

    def add(self, logprobs: torch.Tensor) -> None:
        """Draw for the next rows [C, V] of log-probs."""
        probs = logprobs.detach().double().cpu().exp()
        for row in torch.multinomial(probs, self.n, replacement=True, generator=self.gen).numpy():
            u, c = np.unique(row, return_counts=True)
            self.ids.append(u.astype(np.int32))
            self.counts.append(c.astype(np.uint16))


def sample_counts(logprobs: torch.Tensor, n: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The RS-KD draws (`Draws`) of all rows of `logprobs` [P, V] at once."""
    draws = Draws(n, seed)
    draws.add(logprobs)
    return draws.ids, draws.counts


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
        from shared.mllm import FinalHidden
        from shared.models import load_model, logit_transform, resolve_device

        self.device = resolve_device(device)
        self.model = load_model(model_dir, getattr(torch, dtype)).to(self.device).eval()
        self.batch_size = batch_size
        self.chunk = chunk
        self.encoder = load_encoder(model_dir)
        self.body = FinalHidden.of(self.model, student=False)
        self.transform = logit_transform(self.model.config)
        # The head in float32 (one copy, made once): under bf16 weights its output would be rounded
        # to bf16 before the float32 log-softmax (errors as large as the whole u8 codec's).
        self.head = float32_head(self.body.head)

    @torch.no_grad()
    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        results: list[ScoreResult] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            # Text-only rows simply contribute no image: models fill image tokens in order.
            inputs = batch_inputs(self.encoder, [r.ids for r in chunk], [r.features for r in chunk], self.device,
                                  self.model.dtype)
            hidden = self.body(self.model, {**inputs, "use_cache": False})  # no KV cache: nothing reads it
            for row, req in enumerate(chunk):
                pos = torch.tensor(req.positions, device=hidden.device) - 1  # the state at p-1 predicts ids[p]
                results.append(score_positions(hidden[row, pos], self.head, req, self.chunk, self.transform))
        return results


def float32_head(head: torch.nn.Module) -> torch.nn.Module:
    """The output projection with float32 weights (the module itself when it already is)."""
    if head.weight.dtype == torch.float32:
        return head
    bias = getattr(head, "bias", None)
    out = torch.nn.Linear(head.weight.shape[1], head.weight.shape[0], bias=bias is not None, device="meta")
    out.weight = torch.nn.Parameter(head.weight.detach().float(), requires_grad=False)
    if bias is not None:
        out.bias = torch.nn.Parameter(bias.detach().float(), requires_grad=False)
    return out


def score_positions(hidden: torch.Tensor, head: torch.nn.Module, req: ScoreRequest, chunk: int = 256,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> ScoreResult:
    """The stored values of one request from the final hidden states at its scored positions
    ([P, H], the state at p - 1 for position p): the head `chunk` positions at a time in float32
    (hidden states and weights alike, whatever the model's dtype), the family's logit transform
    (shared/models.py:logit_transform), top-k of the logits and one logsumexp per position (RS-KD
    draws from the whole distribution)."""
    targets = torch.tensor([req.ids[p] for p in req.positions], device=hidden.device)
    target_lp, top_ids, top_lp = [], [], []
    draws = Draws(req.sample, req.sample_seed) if req.sample else None
    for s in range(0, hidden.shape[0], chunk):
        logits = head(hidden[s : s + chunk].to(head.weight.dtype)).float()  # [C, V]
        if transform is not None:
            logits = transform(logits)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        target_lp.append(logits.gather(1, targets[s : s + chunk, None])[:, 0] - lse[:, 0])
        if req.top_k > 0:
            top = torch.topk(logits, req.top_k, dim=-1)
            top_ids.append(top.indices)
            top_lp.append(top.values - lse)
        if draws is not None:
            draws.add(logits - lse)
    target = torch.cat(target_lp).cpu().numpy().astype(np.float32)
    if req.top_k <= 0:
        return ScoreResult(target)
    sampled = (draws.ids, draws.counts) if draws is not None else ([], [])
    return ScoreResult(target, torch.cat(top_ids).cpu().numpy().astype(np.int32),
                       torch.cat(top_lp).cpu().numpy().astype(np.float32), *sampled)


def load_output_head(model_dir: str | Path, dtype: torch.dtype, device: str) -> torch.nn.Linear:
    """The checkpoint's output projection as a Linear, read from its safetensors (the text model's
    input embedding when the two are tied)."""
    import json

    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    tied = config.get("tie_word_embeddings", config.get("text_config", {}).get("tie_word_embeddings", False))
    found: dict[str, Path] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            found.update({k: f for k in h.keys()})
    name = None if tied else next((k for k in found if k.endswith("lm_head.weight")), None)
    name = name or next((k for k in found if k.endswith("embed_tokens.weight") and "vision" not in k), None)
    if name is None:
        raise ValueError(f"{model_dir}: no lm_head.weight or embed_tokens.weight in its safetensors")
    with safe_open(str(found[name]), "pt") as h:
        weight = h.get_tensor(name)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(weight.to(device=device, dtype=dtype), requires_grad=False)
    return head


class VLLMBackend:
    """vLLM, scoring only the positions a dump stores. `scoring="hidden"` (the default): the pooling
    runner hands back the final hidden states of the scored positions only (one prefill, no logits;
    the engine's pooler keeps just those rows, teacher_dump/vllm_positions.py), and the worker
    projects them itself (`score_positions`, as the hf backend does).
    `scoring="logprobs"` (the earlier path, kept as a fallback): `prompt_logprobs=k` over every
    position, flat lists, no detokenisation."""

    name = "vllm"

    def __init__(
        self, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 512, max_logprobs: int = 64,
        gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1, scoring: str = "hidden",
        max_images: int = 1,
    ):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        # The engine core in this process: it schedules the requests it was given, in order, so the
        # batches (and with them the kernels' rounding) are the same on every run; in its own
        # process it starts on whatever has arrived, and a rerun of the same shard differed in the
        # last bit of a few log-probs. On the CPU it is also faster (no busy-polling processes).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        from shared.models import require_vllm_loadable

        require_vllm_loadable(model_dir)
        on_gpu = torch.cuda.is_available()
        self.scoring = scoring
        if scoring == "hidden":
            from vllm.config import PoolerConfig

            # Every position's final (normed) hidden state, not L2-normalised (use_activation=False).
            # Only the scored positions' states leave the engine (teacher_dump/vllm_positions.py).
            runner = {"runner": "pooling", "convert": "embed",
                      "pooler_config": PoolerConfig(pooling_type="ALL", use_activation=False, task="token_embed"),
                      "worker_extension_cls": "teacher_dump.vllm_positions.PositionPoolerExtension"}
            # float32 whatever the engine's dtype (see HFBackend), and the family's logit transform
            self.head = load_output_head(model_dir, torch.float32, "cuda" if on_gpu else "cpu")
            from transformers import AutoConfig

            from shared.models import logit_transform

            self.transform = logit_transform(AutoConfig.from_pretrained(str(model_dir)))
        elif scoring == "logprobs":
            runner = {"max_logprobs": max_logprobs}
        else:
            raise ValueError(f"unknown vLLM scoring {scoring!r}; use 'hidden' or 'logprobs'")
        self.llm = LLM(
            model=str(model_dir),
            dtype=dtype,
            max_model_len=max_model_len,
            **runner,
            enforce_eager=not on_gpu,
            # On the CPU backend this is the share of *host* memory for the KV cache.
            gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.2),
            limit_mm_per_prompt={"image": max_images},
            tensor_parallel_size=tensor_parallel_size,
            # Cached prefixes from earlier shards would change numerics: shards must not depend
            # on what ran before them (resume must give byte-identical files).
            enable_prefix_caching=False,
            seed=0,
        )
        if scoring == "hidden":
            self.llm.collective_rpc("lmod_select_positions")
        if not on_gpu:  # vLLM's renderer sets torch's threads per request; the CPU worker warns each time
            logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)  # (after vLLM's log setup)

    def score(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        return self._score_hidden(requests) if self.scoring == "hidden" else self._score_logprobs(requests)

    def _score_hidden(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from vllm import PoolingParams

        from teacher_dump.vllm_positions import ROWS_KEY

        prompts = [self._prompt(r) for r in requests]
        # the state at p-1 predicts ids[p]: the engine returns those rows only, in this order
        params = [PoolingParams(task="token_embed", extra_kwargs={ROWS_KEY: [p - 1 for p in r.positions]})
                  for r in requests]
        outputs = self.llm.encode(prompts, pooling_params=params, pooling_task="token_embed", use_tqdm=False)
        results = []
        for out, req in zip(outputs, requests):
            _check_expansion(out.prompt_token_ids, req)
            hidden = out.outputs.data
            if hidden.shape[0] != len(req.positions):
                raise RuntimeError(f"vLLM returned {hidden.shape[0]} hidden states for {len(req.positions)} scored "
                                   "positions; its pooler was not replaced (teacher_dump/vllm_positions.py)")
            results.append(score_positions(hidden.to(self.head.weight.device, self.head.weight.dtype), self.head,
                                           req, transform=self.transform))
        return results

    @staticmethod
    def _prompt(r: ScoreRequest) -> dict:
        prompt: dict = {"prompt_token_ids": r.prompt_ids}
        if r.images:
            prompt["multi_modal_data"] = {"image": r.images[0] if len(r.images) == 1 else r.images}
        return prompt

    def _score_logprobs(self, requests: list[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams

        prompts = []
        params = []
        for r in requests:
            prompts.append(self._prompt(r))
            params.append(SamplingParams(
                max_tokens=1, temperature=0.0, prompt_logprobs=r.top_k, flat_logprobs=True, detokenize=False,
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [self._pick(out, req) for out, req in zip(outputs, requests)]

    @staticmethod
    def _pick(out, req: ScoreRequest) -> ScoreResult:
        _check_expansion(out.prompt_token_ids, req)
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


class ExpansionMismatch(RuntimeError):
    """vLLM's expansion of a prompt's images differs from the ids lmod built for it."""


def _check_expansion(prompt_token_ids, req: ScoreRequest) -> None:
    """vLLM expanded the images as the processor does: the same ids, or with image runs counted (not
    made) the same length and the same ids everywhere outside them."""
    got = list(prompt_token_ids)
    if req.counted_id is not None and len(got) == len(req.ids):
        outside = np.asarray(req.ids) != req.counted_id
        same = bool(np.array_equal(np.asarray(got)[outside], np.asarray(req.ids)[outside]))
    else:
        same = got == req.ids
    if not same:
        raise ExpansionMismatch(
            "vLLM expanded the prompt differently from the processor "
            f"({len(prompt_token_ids)} vs {len(req.ids)} tokens); check the model's processor config"
        )


def make_backend(name: str, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 512,
                 max_top_k: int = 64, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float | None = None, vllm_scoring: str = "hidden",
                 max_images: int = 1) -> TeacherBackend:
    """The one place engines are built: `hf` (one device) or `vllm` (tensor-parallel over GPUs).
    `max_images`: the most images one sample has (vLLM sizes its multimodal budget by it)."""
    if name == "hf":
        return HFBackend(model_dir, dtype=dtype)
    if name == "vllm":
        return VLLMBackend(model_dir, dtype=dtype, max_model_len=max_model_len, max_logprobs=max(max_top_k, 1),
                           gpu_memory_utilization=gpu_memory_utilization, tensor_parallel_size=tensor_parallel_size,
                           scoring=vllm_scoring, max_images=max(1, max_images))
    raise ValueError(f"unknown backend {name!r}; use 'vllm' or 'hf'")


# -- generation (lmod generate): answers from any model, the teacher's or a student's -------------------


@dataclass
class GenerateRequest:
    prompt_ids: list[int]  # the generation prompt, unexpanded (one placeholder per image)
    ids: list[int]  # expanded (image runs in place): what transformers is given
    images: list[Image.Image]
    features: list[ImageFeatures]
    seed: int  # the record's own seed (vLLM: per request; transformers: per batch, see HFGenerator)


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256


class HFGenerator:
    """transformers `generate`, left-padded batches. Sampling draws from torch's global generator,
    seeded with the first request's seed before each batch: a batch gives the same answers on every
    run (lmod generate keeps batch boundaries fixed across resumes)."""

    name = "hf"

    def __init__(self, model_dir: str | Path, dtype: str = "float32", device: str = "auto"):
        from shared.models import load_model, resolve_device

        self.device = resolve_device(device)
        self.model = load_model(model_dir, getattr(torch, dtype)).to(self.device).eval()
        self.encoder = load_encoder(model_dir)

    @torch.no_grad()
    def generate(self, requests: list[GenerateRequest], sampling: Sampling) -> list[list[int]]:
        enc = self.encoder
        inputs = batch_inputs(enc, [r.ids for r in requests], [r.features for r in requests], self.device,
                              self.model.dtype, left=True)
        torch.manual_seed(requests[0].seed)
        greedy = sampling.temperature <= 0
        out = self.model.generate(
            **inputs, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
            temperature=None if greedy else sampling.temperature, top_p=None if greedy else sampling.top_p,
            top_k=None, eos_token_id=sorted(enc.eos_ids), pad_token_id=enc.pad_id,
        )
        width = inputs["input_ids"].shape[1]
        return [_through_eos(row, enc.eos_ids) for row in out[:, width:].tolist()]


class VLLMGenerator:
    """vLLM's generate runner; every request carries its own seed, so answers do not depend on batching."""

    name = "vllm"

    def __init__(self, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 2048,
                 gpu_memory_utilization: float | None = None, tensor_parallel_size: int = 1, max_images: int = 1):
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # same reasons as VLLMBackend
        from vllm import LLM

        from shared.models import require_vllm_loadable

        require_vllm_loadable(model_dir)
        on_gpu = torch.cuda.is_available()
        self.model_dir = model_dir
        self.encoder = load_encoder(model_dir)
        mm = {"limit_mm_per_prompt": {"image": max_images}} if self.encoder.multimodal else {}
        self.llm = LLM(model=str(model_dir), dtype=dtype, max_model_len=max_model_len, enforce_eager=not on_gpu,
                       gpu_memory_utilization=gpu_memory_utilization or (0.9 if on_gpu else 0.2),
                       tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=False, seed=0, **mm)
        if not on_gpu:
            logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)

    def generate(self, requests: list[GenerateRequest], sampling: Sampling) -> list[list[int]]:
        from vllm import SamplingParams

        eos = sorted(self.encoder.eos_ids)
        params = [SamplingParams(temperature=max(0.0, sampling.temperature), top_p=sampling.top_p,
                                 max_tokens=sampling.max_new_tokens, seed=r.seed % (1 << 63), stop_token_ids=eos,
                                 detokenize=False, logprobs=0) for r in requests]
        prompts = [VLLMBackend._prompt(ScoreRequest(r.ids, r.prompt_ids, [], r.images, r.features, 0))
                   for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for o in outputs:  # the sampled tokens' log-probs: NaN means the engine computed garbage
            chosen = [step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs or [])]
            if not all(math.isfinite(x) or x == -math.inf for x in chosen):
                from shared.models import ModelError

                raise ModelError(f"{self.model_dir}: vLLM computed log-probs that are not numbers (NaN) for this "
                                 "model; generate with --backend hf")
        return [_through_eos(list(o.outputs[0].token_ids), self.encoder.eos_ids) for o in outputs]


def _through_eos(ids: list[int], eos: set[int]) -> list[int]:
    """Generated ids up to and including the first end-of-turn token (the rest is padding)."""
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    return ids if cut is None else ids[: cut + 1]


def make_generator(name: str, model_dir: str | Path, dtype: str = "float32", max_model_len: int = 2048,
                   max_images: int = 1) -> HFGenerator | VLLMGenerator:
    if name == "hf":
        return HFGenerator(model_dir, dtype=dtype)
    if name == "vllm":
        return VLLMGenerator(model_dir, dtype=dtype, max_model_len=max_model_len, max_images=max_images)
    raise ValueError(f"unknown backend {name!r}; use 'vllm' or 'hf'")
