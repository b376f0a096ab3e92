"""`lmod train --dry-run`: the per-rank memory a training config will need, before anything trains.

    weights     every parameter in float32 (the masters), plus its bf16 working copy under bf16
    grads       float32 gradients of the trainable parameters (+ the bf16 micro-batch gradient under
                bf16, + DDP's float32 reducer buckets)
    optimizer   AdamW's two float32 moments per trainable parameter
    activations what the decoder layers keep for backward, per token and per layer type, measured
                once by running one layer of each type of this model (random weights, the run's
                dtype, the run's trainable parts) under autograd's saved-tensor hooks, times the
                tokens of one micro-batch on one rank; with activation checkpointing, each layer's
                input plus one layer's recomputation
    head_chunk  the fused output head's [loss_chunk, V] float32 buffers (+ its float32 weight-gradient
                accumulator when the head trains)

Weights, gradients and optimizer state are divided over the ranks under `parallel: fsdp` (plus the
largest layer gathered). The model is built on the meta device: nothing is loaded. The vision
tower's activations are not counted (it is frozen in the distillation stages; a trainable tower adds
its own per image). `pipelines/benchmarks/bench_memory_plan.py` and tests/test_memory_plan.py compare the
prediction with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from student_train.config import TrainConfig

GIB = 1024**3
_MEASURE_TOKENS = 1024  # tokens of the larger layer measurement (the smaller has half): beyond fixed costs
_HEAD_BUFFERS = 4  # [chunk, V] float32 buffers alive at once in the fused head (logits, log-softmax, grad, leaf)


@dataclass
class MemoryPlan:
    """Bytes per rank; `total` is their sum."""

    weights: int
    grads: int
    optimizer: int
    activations: int
    head_chunk: int
    detail: dict[str, Any]

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations + self.head_chunk

    def report(self, gpu_memory_gb: float | None = None, rows_that_fit: int | None = None) -> dict[str, Any]:
        gib = {k: round(getattr(self, k) / GIB, 4) for k in ("weights", "grads", "optimizer", "activations",
                                                             "head_chunk", "total")}
        out: dict[str, Any] = {**{f"{k}_gib": v for k, v in gib.items()},
                               **{k: getattr(self, k) for k in ("weights", "grads", "optimizer", "activations",
                                                                "head_chunk", "total")},
                               **self.detail}
        if gpu_memory_gb is not None:
            out["gpu_memory_gib"] = gpu_memory_gb
            out["fits"] = self.total <= gpu_memory_gb * GIB
            out["largest_batch_size"] = rows_that_fit
        return out


def _meta_model(student: Path) -> torch.nn.Module:
    from transformers import AutoConfig

    from shared.models import model_from_config, read_config

    read_config(student)  # a one-line error for a missing or broken config.json
    config = AutoConfig.from_pretrained(str(student))
    with torch.device("meta"):
        return model_from_config(config, torch.float32)


def _layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers of the language model (the longest ModuleList named `layers` under it)."""
    from student_train.parts import part_of

    text_only = not hasattr(model.config, "vision_config")
    found = [(name, m) for name, m in model.named_modules()
             if name.endswith("layers") and isinstance(m, torch.nn.ModuleList)
             and part_of(name + ".", text_only) == "language"]
    if not found:
        raise ValueError(f"{type(model).__name__}: no decoder layers found to measure")
    return max(found, key=lambda nm: len(nm[1]))


def _signature(layer: torch.nn.Module) -> str:
    experts = any(name.endswith("experts") for name, _ in layer.named_modules())
    return f"{type(layer).__name__}{'-moe' if experts else '-dense'}"


@dataclass(frozen=True)
class LayerCost:
    """Bytes per token of one decoder layer in training: what its forward keeps for backward, and the
    peak of its forward + backward (kept activations, temporaries and gradients of activations;
    parameters and their gradients excluded)."""

    saved: float
    peak: float


class _LiveBytes:
    """The peak of the bytes of tensor storages allocated inside the block and still alive (a
    dispatch mode sees every op, forward and backward; a storage is freed when its Python object
    dies, which PyTorch keeps alive exactly as long as the storage)."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __enter__(self) -> _LiveBytes:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        key = storage._cdata  # the storage itself: unique while it lives
                        if storage.nbytes() and key not in tracker.live:
                            tracker.live[key] = storage.nbytes()
                            tracker.now += storage.nbytes()
                            tracker.peak = max(tracker.peak, tracker.now)
                            weakref.finalize(storage, tracker._free, key)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)


def _layer_run(layer: torch.nn.Module, text_config: Any, input_grad: bool, dtype: torch.dtype, tokens: int,
               rotary: torch.nn.Module) -> tuple[int, int]:
    """(bytes kept for backward, peak bytes of forward + backward) of one layer on `tokens` tokens."""
    import gc

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    hidden = torch.randn(1, tokens, text_config.hidden_size, dtype=dtype, requires_grad=input_grad)
    positions = torch.arange(tokens)[None]
    with torch.no_grad():
        cos_sin = rotary(hidden, positions)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    gc.collect()
    with _LiveBytes() as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
        del out
    return sum(seen.values()), live.peak


def measure_layer(layer_cls: type, text_config: Any, index: int, trainable: set[str], input_grad: bool,
                  dtype: torch.dtype, tokens: int, rotary: torch.nn.Module) -> LayerCost:
    """One layer built from the config (random weights, the run's dtype and trainable parameters)
    run forward and backward on one row of tokens/2 and of `tokens` tokens; the costs per token are
    the differences over tokens/2 (what does not grow with tokens, such as the parameters'
    gradients, cancels). Kept bytes are counted through autograd's saved-tensor hooks (unique
    storages, the parameters excluded), the peak through a dispatch mode over every allocation."""
    if not (trainable or input_grad):
        return LayerCost(0.0, 0.0)  # no gradient flows through it: autograd keeps nothing
    torch.manual_seed(0)
    layer = layer_cls(text_config, index).to(dtype)
    for name, p in layer.named_parameters():
        p.requires_grad_(name in trainable)
    half = max(1, tokens // 2)
    saved_a, peak_a = _layer_run(layer, text_config, input_grad, dtype, half, rotary)
    saved_b, peak_b = _layer_run(layer, text_config, input_grad, dtype, tokens, rotary)
    span = tokens - half
    return LayerCost((saved_b - saved_a) / span, (peak_b - peak_a) / span)


def measure_outside_layers(student: Path, cfg: TrainConfig, grad_out: bool, tokens: int) -> float:
    """Bytes per token of the step outside the decoder layers (embeddings, masks, final norm, the
    response positions' hidden states): the student built from its config without its decoder
    layers (random weights, the run's trainable parts), one row of tokens/2 and of `tokens` tokens
    through the body and a 32-position output-head loss, the peak difference over tokens/2.
    `grad_out`: whether a gradient flows into the final norm (some layer trains)."""
    from contextlib import nullcontext

    from transformers import AutoConfig

    from shared.mllm import FinalHidden
    from shared.models import model_from_config
    from student_train.losses import OutputHead, token_logprobs
    from student_train.parts import apply_trainable
    from student_train.precision import bf16_weights

    torch.manual_seed(0)
    model = model_from_config(AutoConfig.from_pretrained(str(student)), torch.float32)
    apply_trainable(model, cfg.train, f"student {student}")
    layers_name, _ = _layers(model)
    parent_name, attr = layers_name.rsplit(".", 1)
    setattr(model.get_submodule(parent_name), attr, torch.nn.ModuleList())
    model.train()
    if grad_out:  # as if the (removed) layers trained: their output carries a gradient
        model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True)
                                                           if not out.requires_grad else out)
    body = FinalHidden.of(model)
    head = OutputHead.of(body.head, None)
    vocab = body.head.weight.shape[0]
    bf16 = cfg.dtype == "bfloat16"
    peaks = []
    half = max(64, tokens // 2)
    for n in (half, tokens):
        ids = torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(0))
        cols = torch.arange(n - 33, n - 1)
        with _LiveBytes() as live, (bf16_weights(model) if bf16 else nullcontext()), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            hidden = body(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0, cols]
            loss = token_logprobs(hidden, ids[0, cols + 1], head=head, chunk=cfg.loss_chunk).sum()
            if loss.requires_grad:
                loss.backward()
            del hidden, loss
        model.zero_grad(set_to_none=True)
        peaks.append(live.peak)
    return (peaks[1] - peaks[0]) / (tokens - half)


def plan_memory(student: Path, cfg: TrainConfig, ranks: int, tokens_per_row: int, measured: dict | None = None
                ) -> tuple[MemoryPlan, dict]:
    """The plan of `cfg` on `ranks` ranks for micro-batches of rows of `tokens_per_row` tokens.
    Returns it with the per-token measurements (pass them back in `measured` to plan other batch
    sizes without measuring again)."""
    from student_train.parts import apply_trainable

    model = _meta_model(student)
    apply_trainable(model, cfg.train, f"student {student}")
    params = list(model.parameters())
    n_all = sum(p.numel() for p in params)
    n_train = sum(p.numel() for p in params if p.requires_grad)
    bf16 = cfg.dtype == "bfloat16"
    compute_bytes = 2 if bf16 else 4
    fsdp = ranks > 1 and cfg.parallel == "fsdp"
    layers_name, layers = _layers(model)
    largest_layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers)

    weights = 4 * n_all + (2 * n_all if bf16 else 0)
    grads = 4 * n_train + (2 * n_train if bf16 else 0)
    optimizer = 8 * n_train
    if fsdp:
        weights = 4 * n_all // ranks + 2 * compute_bytes * largest_layer  # shards + one layer gathered (+ prefetch)
        grads = 4 * n_train // ranks + 4 * largest_layer
        optimizer = optimizer // ranks
    elif ranks > 1 and not bf16:
        grads += 4 * n_train  # DDP's reducer buckets hold a copy of the gradients

    text_config = model.config.get_text_config()
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    # Which layers a gradient flows through, and with which of their parameters training.
    upstream = any(not n.startswith(layers_name + ".") and p.requires_grad and "embed" in n
                   for n, p in model.named_parameters())
    kinds: list[tuple[str, tuple[str, ...], bool, int]] = []
    for index, layer in enumerate(layers):
        prefix = f"{layers_name}.{index}."
        trainable = tuple(sorted(n[len(prefix):] for n in names if n.startswith(prefix)))
        kinds.append((_signature(layer), trainable, upstream, index))
        upstream = upstream or bool(trainable)
    key = [f"{sig}{'+train' if tr else ''}{'+grad_in' if gi else ''}" for sig, tr, gi, _ in kinds]
    if measured is None:
        rotary_module = next((m for n, m in model.named_modules() if n.endswith("rotary_emb")), None)
        if rotary_module is None:
            raise ValueError(f"{type(model).__name__}: no rotary embedding found to measure its layers with")
        rotary = type(rotary_module)(config=text_config)
        dtype = torch.bfloat16 if bf16 else torch.float32
        measured = {}
        for k, (_, trainable, grad_in, index) in zip(key, kinds, strict=True):
            if k not in measured:
                measured[k] = measure_layer(type(layers[index]), text_config, index, set(trainable), grad_in,
                                            dtype, _MEASURE_TOKENS, rotary)
    counts: dict[str, int] = {}
    for k in key:
        counts[k] = counts.get(k, 0) + 1
    rows = max(1, cfg.batch_size // ranks)
    tokens = rows * tokens_per_row
    hidden_bytes = text_config.hidden_size * compute_bytes
    if "outside_layers" not in measured:
        measured["outside_layers"] = LayerCost(0.0, measure_outside_layers(student, cfg, upstream,
                                                                           2 * _MEASURE_TOKENS))
    costs = [measured[k] for k in key]
    if cfg.activation_checkpointing:  # each layer keeps its input; one layer at a time is recomputed
        per_token = sum(hidden_bytes for c in costs if c.peak) + max(c.peak for c in costs)
    else:  # all layers' kept activations, plus the last one's backward beyond what it kept
        per_token = sum(c.saved for c in costs) + max(c.peak - c.saved for c in costs)
    per_token += measured["outside_layers"].peak
    activations = int(tokens * per_token)
    vocab = model.get_output_embeddings().weight.shape[0]
    head_trains = model.get_output_embeddings().weight.requires_grad
    head_chunk = _HEAD_BUFFERS * cfg.loss_chunk * vocab * 4 + (4 * vocab * text_config.hidden_size if head_trains
                                                              else 0)
    detail = {
        "parameters": n_all, "trainable_parameters": n_train, "ranks": ranks, "parallel": cfg.parallel,
        "dtype": cfg.dtype, "activation_checkpointing": cfg.activation_checkpointing,
        "rows_per_rank": rows, "tokens_per_row": tokens_per_row, "tokens_per_micro_batch": tokens,
        "activation_bytes_per_token_per_layer": {k: {"saved": round(c.saved), "peak": round(c.peak)}
                                                 for k, c in measured.items()},
        "layers": counts, "vocab": vocab,
    }
    return MemoryPlan(weights, grads, optimizer, activations, head_chunk, detail), measured


def largest_batch_size(student: Path, cfg: TrainConfig, ranks: int, tokens_per_row: int, budget_bytes: int,
                       measured: dict) -> int:
    """The largest global micro-batch (rows over all ranks, a multiple of `ranks`) whose plan fits
    `budget_bytes` per rank (the plan is linear in rows); 0 when not even one row per rank fits."""
    from dataclasses import replace

    one, _ = plan_memory(student, replace(cfg, batch_size=ranks), ranks, tokens_per_row, measured)
    two, _ = plan_memory(student, replace(cfg, batch_size=2 * ranks), ranks, tokens_per_row, measured)
    per_row = max(1, two.total - one.total)
    if one.total > budget_bytes:
        return 0
    return (1 + (budget_bytes - one.total) // per_row) * ranks


def dry_run(shards: list[Path], student: Path, cfg: TrainConfig, image_root: Path | None, ranks: int,
            gpu_memory_gb: float | None = None, batches: int = 8) -> dict[str, Any]:
    """The memory plan of a `lmod train` command, its tokens per row taken from the longest of the
    first `batches` micro-batches it would train on (the student's own encoding of the dump's rows,
    images included); the shards are checked as training checks them."""
    from shared.mllm import load_encoder
    from student_train.cross_tokenizer import AlignmentError, TokenBridge
    from student_train.data import MicroBatches, check_shards
    from student_train.dumps import Dumps

    encoder = load_encoder(student)
    dumps = Dumps.open(shards)
    sampled = cfg.stage == "mimic" and cfg.kd == "sampled"
    try:
        bridge = TokenBridge.for_dumps(dumps, encoder, cfg.cross_vocab)
    except AlignmentError as e:
        raise ValueError(str(e)) from None
    files = check_shards(dumps, cfg.stage, encoder, sampled=sampled, cross=bridge is not None)
    data = MicroBatches(cfg.stage, files, student, image_root, cfg.batch_size, seed=cfg.seed,
                        window=cfg.shuffle_window, rank=0, world=ranks, sampled=sampled, bridge=bridge)
    lengths = []
    for i in range(batches):
        batch = data[i]
        if hasattr(batch, "message"):  # a LoaderFailure: the training run would stop on it too
            raise ValueError(batch.message)
        lengths.append(batch.inputs["input_ids"].shape[1])
    per_example = 2 if cfg.stage == "pref" else 1  # a preference pair is two sequences
    tokens_per_row = max(lengths) * per_example
    plan, measured = plan_memory(student, cfg, ranks, tokens_per_row)
    fit = None
    if gpu_memory_gb is not None:
        fit = largest_batch_size(student, cfg, ranks, tokens_per_row, int(gpu_memory_gb * GIB), measured)
    report = plan.report(gpu_memory_gb, fit)
    if {"vision", "all"} & set(cfg.train):
        report["not_counted"] = "the vision tower's activations (it trains in this config)"
    return report
