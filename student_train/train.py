"""`lmod train --stage mimic|pref`: the student trains from teacher shards only.

Setup (`setup`) apart from the step (`train_step`, one optimizer step over `grad_accum`
micro-batches, returning a `StepResult`) apart from the loop (`train`: data, logging,
checkpoints). Batches stream from the shards through DataLoader workers in an order that is a
pure function of (seed, step), so a resumed run continues exactly where its checkpoint left it and
N DDP ranks compute what one process does on the same global batch.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from shared.mllm import FinalHidden, SampleEncoder, load_encoder
from shared.models import ModelError, check_embeddings, load_model, resolve_device
from student_train.config import TrainConfig, TrainError, rows_per_source
from student_train.cross_tokenizer import AlignmentError, TokenBridge
from student_train.data import (
    LoaderFailure,
    MicroBatches,
    MimicBatch,
    PrefBatch,
    ShardError,
    check_shards,
    iter_examples,
    loader,
)
from student_train.dumps import Dumps
from student_train.objectives import RouterTap, mimic_terms, pref_terms
from student_train.parts import apply_trainable, unused_safe_params
from student_train.precision import bf16_weights, compute_dtype, fsdp_kwargs

__all__ = ["TrainConfig", "TrainError", "mimic_terms", "pref_terms", "setup", "train", "train_step"]


@dataclass
class Dist:
    """Data-parallel position under torchrun (WORLD_SIZE, RANK, LOCAL_RANK); 1 process otherwise."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    gloo: Any = None  # a CPU process group for small control messages (made when first needed)
    owned: bool = False  # this run started the process group (and so ends it)

    @classmethod
    def setup(cls, device: str, timeout_s: int = 1800) -> Dist:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            from datetime import timedelta

            td.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                  timeout=timedelta(seconds=timeout_s))
            return cls(td.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")), owned=True)
        return cls(td.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    def close(self, clean: bool = True) -> None:
        """End the process groups this run started. Left to the interpreter's exit, gloo's worker
        threads can outlive it and abort the process (SIGABRT, "terminate called without an active
        exception") after an error that every rank had agreed on. After an error (`clean=False`)
        an NCCL group is left alone: its destroy may wait on a peer still in a collective, and a
        rank that exits at once is what lets torchrun stop the others."""
        if not self.owned:
            return
        import torch.distributed as td

        if td.is_initialized() and (clean or td.get_backend() == "gloo"):
            td.destroy_process_group()
        self.owned, self.gloo = False, None

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of a tensor on the training device (NCCL reduces device tensors only)."""
        if self.world > 1:
            import torch.distributed as td

            td.all_reduce(t)
        return t

    def average_grads(self, params: list[torch.nn.Parameter], bucket: int = 1 << 25) -> None:
        """Each parameter's gradient averaged over ranks, in float32 buckets of up to `bucket`
        elements (a rank whose micro-batches never reached a parameter contributes zeros)."""
        if self.world == 1:
            return
        import torch.distributed as td

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        groups: list[list[torch.nn.Parameter]] = [[]]
        for p in params:
            if groups[-1] and sum(q.numel() for q in groups[-1]) + p.numel() > bucket:
                groups.append([])
            groups[-1].append(p)
        for group in groups:
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            td.all_reduce(flat)
            flat /= self.world
            for p, g in zip(group, flat.split([p.numel() for p in group]), strict=True):
                p.grad.copy_(g.view_as(p))

    def first_error(self, error: Exception | None) -> Exception | None:
        """The error of the lowest rank that has one, on every rank (None when none has): a rank
        whose data fails stops all ranks at the same step instead of leaving them in a collective."""
        if self.world == 1:
            return error
        import torch.distributed as td

        failed = torch.tensor([0 if error is None else 1], dtype=torch.int64)
        if self.gloo is None:
            self.gloo = td.new_group(backend="gloo")  # CPU flags whatever the training backend
        td.all_reduce(failed, group=self.gloo)
        if not int(failed):
            return None
        messages: list = [None] * self.world
        td.all_gather_object(messages, None if error is None else (type(error).__name__, str(error)),
                             group=self.gloo)
        rank, (kind, message) = next((r, m) for r, m in enumerate(messages) if m is not None)
        if error is not None and rank == self.rank:
            return error
        return (TrainError if kind == "TrainError" else ShardError)(message)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def from_rank0(self, fn):
        """fn() computed once, on rank 0, and handed to every rank (an exception it raises is
        raised on every rank, so none waits for the others forever)."""
        result: list = [None]
        if self.rank == 0:
            try:
                result = [(fn(), None)]
            except Exception as e:  # re-raised below, on every rank
                result = [(None, e)]
        if self.world > 1:
            import torch.distributed as td

            td.broadcast_object_list(result, src=0)
        value, error = result[0]
        if error is not None:
            raise error
        return value


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 0 at `cfg.steps`."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Setup, step, loop


@dataclass
class Trainer:
    """Everything `setup` builds once: the loop and the step only read it (and the step counter)."""

    cfg: TrainConfig
    device: str
    dist: Dist
    model: torch.nn.Module
    forward_model: torch.nn.Module  # DDP wrapper under torchrun, else the model
    opt: torch.optim.Optimizer
    tap: RouterTap
    body: FinalHidden  # the model's final hidden states; the loss applies the output projection
    encoder: SampleEncoder
    vocab: int  # the shared vocabulary: student logits beyond it are sliced off
    data: MicroBatches
    out: Path
    always_touched: list[torch.nn.Parameter]  # trainable params a micro-batch may not reach (parts.py)
    trained_parts: dict[str, int]  # parameters that train, per part
    step: int = 0


@dataclass
class StepResult:
    """One optimizer step, reduced over micro-batches and ranks."""

    step: int
    metrics: dict[str, float]  # loss and its terms (means over the global batch), tokens
    expert_load: list[float]  # share of routed slots per expert, all MoE layers
    expert_load_per_layer: list[list[float]]
    grad_norm: float
    lr: float

    def record(self, elapsed_s: float) -> dict[str, Any]:
        return {"step": self.step, **self.metrics, "expert_load": self.expert_load,
                "expert_load_per_layer": self.expert_load_per_layer, "grad_norm": self.grad_norm, "lr": self.lr,
                "elapsed_s": round(elapsed_s, 3)}


def setup(shards: list[Path], student: Path, out: Path, cfg: TrainConfig, image_root: Path | None = None,
          resume: bool = False, allow_partial: bool = False, verify_shards: bool = True) -> Trainer:
    """Everything a run holds, checked before the first step. `verify_shards=False`: the caller has
    hashed the dump's files already (a sweep checks it once for all its trials)."""
    device = resolve_device(cfg.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device: {cfg.device}: no GPU is visible here; use device: cpu (or auto)")
    dist = Dist.setup(device, cfg.collective_timeout_s)
    try:
        return _prepare(dist, device, shards, student, out, cfg, image_root, resume, allow_partial, verify_shards)
    except BaseException:
        dist.close(clean=False)
        raise


def _prepare(dist: Dist, device: str, shards: list[Path], student: Path, out: Path, cfg: TrainConfig,
             image_root: Path | None, resume: bool, allow_partial: bool, verify_shards: bool) -> Trainer:
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    if dist.world > 1 and cfg.device.startswith("cuda:"):
        raise TrainError(f"device: {cfg.device} under {dist.world} ranks would put every rank on one GPU; use "
                         "device: cuda (each rank takes its LOCAL_RANK's GPU) or auto")
    if cfg.batch_size % dist.world:
        raise TrainError(f"batch_size {cfg.batch_size} must be divisible by the {dist.world} ranks")
    out = Path(out)
    _check_out(out, student, shards, resume)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume:
        _check_resumable(out, checkpoint, cfg)
        # Hashed once (rank 0), not once per GPU: a real checkpoint is tens of GB.
        checkpoint = dist.from_rank0(lambda: usable_checkpoint(out, checkpoint))
    encoder = load_encoder(student)
    dumps = Dumps.open(shards)  # every manifest read once, here
    sampled = cfg.stage == "mimic" and cfg.kd == "sampled"
    try:
        bridge = TokenBridge.for_dumps(dumps, encoder, cfg.cross_vocab)
    except AlignmentError as e:
        raise TrainError(str(e)) from None
    if bridge is not None and sampled:
        raise TrainError("kd: sampled reads the teacher's draws in its own ids; a student with another tokenizer "
                         "trains with kd: topk")
    # Hashed once, on rank 0 (every file's bytes against the manifest), and handed to every rank.
    files = dist.from_rank0(lambda: check_shards(dumps, cfg.stage, encoder, allow_partial=allow_partial,
                                                 verify=verify_shards, sampled=sampled, cross=bridge is not None))
    if bridge is not None:
        _check_alignment(bridge, encoder, files, cfg, dist)
    if image_root is None:  # where the teacher found the images, when the dumps recorded it
        image_root = dumps.image_root(cfg.stage)
        if image_root is not None and dist.rank == 0:
            print(f"lmod: images from {image_root} (where the teacher read them; --image-root to change)",
                  file=sys.stderr)
    mix, file_sources = _dump_mix(cfg, dumps, files)
    data = MicroBatches(cfg.stage, files, student, image_root, cfg.batch_size, seed=cfg.seed,
                        window=cfg.shuffle_window, rank=dist.rank, world=dist.world, sampled=sampled, bridge=bridge,
                        mix=mix, file_sources=file_sources)
    torch.manual_seed(cfg.seed)
    model = load_model(checkpoint or student, torch.float32).to(device)
    try:
        check_embeddings(model, len(encoder.tokenizer), f"--student {student}")
    except ModelError as e:
        raise TrainError(str(e)) from None
    model.train()
    try:
        trained_parts = apply_trainable(model, cfg.train, f"{encoder.family.name} student {student}")
    except ValueError as e:
        raise TrainError(str(e)) from None
    if cfg.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise TrainError(f"activation_checkpointing: {type(model).__name__} does not support it in transformers")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tap = RouterTap(model)
    fsdp = dist.world > 1 and cfg.parallel == "fsdp"
    # Frozen parameters get no gradient, no optimizer state and are not all-reduced.
    compute = compute_dtype(cfg.dtype)  # weights compute in it; float32 masters in the optimizer (precision.py)
    if fsdp:
        forward_model = shard_model(model, compute)
    elif dist.world > 1 and compute == torch.float32:
        forward_model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        forward_model = model
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.startswith("cuda"))
    step = 0
    if checkpoint is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if fsdp:
            # The gathered (name-keyed) state is read by rank 0 only, into host memory, and each rank
            # receives its shard of it: no rank ever holds the whole optimizer state on its GPU.
            state = (torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
                     if dist.rank == 0 else {"optimizer": {}})
            set_optimizer_state_dict(model, opt, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            # Each rank reads the optimizer state onto its own device (not the device it was saved from).
            state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location=device)
            if state.get("layout") == "full":  # written by a sharded run (name-keyed), resumed unsharded
                set_optimizer_state_dict(model, opt, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(state["optimizer"])
        step = checkpoint_step(checkpoint)
        del state
    return Trainer(cfg, device, dist, model, forward_model, opt, tap, FinalHidden.of(model), encoder,
                   len(encoder.tokenizer), data, out, unused_safe_params(model), trained_parts, step)


def _dump_mix(cfg: TrainConfig, dumps: Dumps, files: list[Path]) -> tuple[list[int] | None, list[int] | None]:
    """With `dump_mix`: each batch's rows per --dump, and the --dump of each shard file."""
    if cfg.dump_mix is None:
        return None, None
    if len(cfg.dump_mix) != len(dumps):
        raise TrainError(f"dump_mix has {len(cfg.dump_mix)} shares for {len(dumps)} --dump directories; give one "
                         "share per --dump, in the order given")
    dirs = [d.resolve() for d in dumps.dirs]
    sources = [next(i for i, d in enumerate(dirs) if Path(f).resolve().is_relative_to(d)) for f in files]
    for i, d in enumerate(dumps.dirs):
        if i not in sources:
            raise TrainError(f"{d}: no {cfg.stage} shards to draw its dump_mix share {cfg.dump_mix[i]:g} from")
    return rows_per_source(cfg.batch_size, cfg.dump_mix), sources


def _check_alignment(bridge: TokenBridge, encoder: SampleEncoder, files: list[Path], cfg: TrainConfig,
                     dist: Dist) -> None:
    """One line saying the run takes the cross-tokenizer path and how much of the teacher's signal
    reaches the student (measured on the first rows); too little is refused."""
    if cfg.stage == "pref":
        if dist.rank == 0:
            print("lmod: the student's tokenizer differs from the teacher's: preference pairs are scored in the "
                  "student's own tokens (the teacher's references are whole-answer log-probs)", file=sys.stderr)
        return
    try:
        coverage = bridge.coverage(encoder, islice(iter_examples(files, "mimic", None, with_image=False), 256))
    except ValueError as e:
        raise TrainError(f"cross-tokenizer alignment: {e}") from None
    line = (f"{coverage.position_share:.1%} of {coverage.positions} response positions (first rows) pair with a "
            f"teacher position, carrying {coverage.mass_share:.1%} of its top-k mass")
    if coverage.position_share < cfg.min_paired:
        raise TrainError(f"the student's tokenizer differs from the teacher's and only {line}; below min_paired "
                         f"{cfg.min_paired:.0%}: distil with a student closer to the teacher's tokenizer")
    if dist.rank == 0:
        print(f"lmod: the student's tokenizer differs from the teacher's: cross-tokenizer distillation; {line}",
              file=sys.stderr)


def shard_model(model: torch.nn.Module, compute: torch.dtype = torch.float32) -> torch.nn.Module:
    """FSDP2: each language-model layer (the family's `_no_split_modules`) is its own group, gathered
    for its forward and backward only; the rest (vision tower, projector, embeddings, head) is one
    root group that every rank gathers at every forward, so a micro-batch without images runs the
    same collectives as one with images."""
    from torch.distributed.fsdp import fully_shard

    from student_train.parts import part_of

    layers = set(getattr(model, "_no_split_modules", None) or [])
    policy = fsdp_kwargs(compute)
    for name, module in model.named_modules():
        if type(module).__name__ in layers and part_of(name + ".") == "language":
            fully_shard(module, **policy)
    fully_shard(model, **policy)
    return model


def full_state(t: Trainer) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Under FSDP the whole model and optimizer state gathered onto the CPU (a collective: every
    rank calls it); None otherwise (rank 0 saves its replica)."""
    if not (t.dist.world > 1 and t.cfg.parallel == "fsdp"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(t.model, options=opts), get_optimizer_state_dict(t.model, t.opt, options=opts)


def forward_backward(t: Trainer, batch: MimicBatch | PrefBatch, denominators: dict[str, float], sync: bool
                     ) -> dict[str, torch.Tensor]:
    """Loss of one micro-batch, normalised by the global counts of the whole accumulated batch, and its
    backward (gradients all-reduced by DDP only when `sync`). Returns detached sums for the metrics."""
    cfg = t.cfg
    autocast = torch.autocast(device_type=t.device.split(":")[0], dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bfloat16")
    fsdp = t.dist.world > 1 and cfg.parallel == "fsdp"
    if fsdp:
        t.forward_model.set_requires_gradient_sync(sync)  # FSDP's no_sync: reduce-scatter on the last only
        no_sync = nullcontext()
    else:
        ddp = isinstance(t.forward_model, torch.nn.parallel.DistributedDataParallel)
        no_sync = t.forward_model.no_sync() if ddp and not sync else nullcontext()
    # bf16 weights around this micro-batch; FSDP applies its own policy (precision.py).
    weights = bf16_weights(t.model) if cfg.dtype == "bfloat16" and not fsdp else nullcontext()
    with no_sync, weights:
        with autocast:
            if cfg.stage == "mimic":
                terms = mimic_terms(t.forward_model, batch, cfg, t.body, t.vocab, t.tap)
            else:
                terms = pref_terms(t.forward_model, batch, cfg, t.body, t.vocab, t.tap,
                                   all_sum=t.dist.all_sum if t.dist.world > 1 else None)
        # DDP averages gradients over ranks, so each rank divides by (global count / ranks).
        per_rank = {k: v / t.dist.world for k, v in denominators.items()}
        if cfg.stage == "mimic":
            loss = terms.pop("objective") / per_rank["tokens"]  # kd_weight * KL + ce_weight * CE, summed
        else:
            loss = terms["dpo_loss"] / per_rank["pairs"] + cfg.pref_ce_weight * terms["ce"] / per_rank["tokens"]
        loss = loss + (cfg.aux_loss_coef * terms["aux_loss"] + cfg.z_loss_coef * terms["z_loss"]) / per_rank["micro"]
        # The same gradient set on every rank, whatever it read. Under FSDP the parameters are looked up
        # now: after the forward the module holds the gathered (unsharded) ones.
        touched = unused_safe_params(t.model) if cfg.parallel == "fsdp" else t.always_touched
        if t.dist.world > 1 and touched:
            loss = loss + 0.0 * torch.stack([p.sum() for p in touched]).sum()
        loss.backward()
    return {"loss": loss.detach().double(), **{k: v.detach().double() for k, v in terms.items()}}


# metric -> the global count its sum is divided by
_MEAN_OVER = {"loss": "ranks", "kl": "tokens", "sampled_kd": "tokens", "ce": "tokens", "dpo_loss": "pairs",
              "pref_accuracy": "pairs", "reward_margin": "pairs", "aux_loss": "micro", "z_loss": "micro"}


def train_step(t: Trainer, micro_batches: list[MimicBatch | PrefBatch]) -> StepResult:
    """One optimizer step over this rank's micro-batches. Two collectives besides DDP's: the global
    token/pair counts before the first backward, the metric sums after the last."""
    cfg, dist = t.cfg, t.dist
    lr = lr_at(t.step, cfg)
    for group in t.opt.param_groups:
        group["lr"] = lr
    counts = dist.all_sum(torch.tensor([float(sum(b.tokens for b in micro_batches)),
                                        float(sum(getattr(b, "pairs", 0) for b in micro_batches))],
                                       dtype=torch.float64, device=t.device)).tolist()
    denominators = {"tokens": max(counts[0], 1.0), "pairs": max(counts[1], 1.0),
                    "micro": float(len(micro_batches) * dist.world)}
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):  # one micro-batch on the device at a time
        last = i == len(micro_batches) - 1
        for k, v in forward_backward(t, batch.to(t.device), denominators, sync=last).items():
            sums[k] = sums[k] + v if k in sums else v
    if t.dist.world > 1 and cfg.parallel == "ddp" and cfg.dtype == "bfloat16":  # float32 gradients reduced here
        dist.average_grads([p for p in t.model.parameters() if p.requires_grad])
    expert_counts = sums.pop("expert_counts")
    names = sorted(sums)
    reduced = dist.all_sum(torch.cat([torch.stack([sums[k] for k in names]), expert_counts.double().reshape(-1)]))
    values = reduced[: len(names)].tolist()
    denominators["ranks"] = float(dist.world)
    metrics = {k: v / denominators[_MEAN_OVER[k]] for k, v in zip(names, values, strict=True) if k in _MEAN_OVER}
    metrics["tokens"] = counts[0]
    per_layer = reduced[len(names):].reshape(expert_counts.shape)
    norm = torch.nn.utils.clip_grad_norm_([p for p in t.model.parameters() if p.requires_grad], cfg.grad_clip)
    grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor under FSDP
    if not (math.isfinite(metrics["loss"]) and math.isfinite(grad_norm)):  # before anything reaches the weights
        terms = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        t.opt.zero_grad(set_to_none=True)
        raise TrainError(f"step {t.step + 1}: the loss is not finite ({terms}, grad_norm={grad_norm:.4g}); nothing "
                         "of this step was applied. Check the shards (`lmod shards verify`) and the lr, then --resume")
    t.opt.step()
    t.opt.zero_grad(set_to_none=True)
    t.step += 1
    total = per_layer.sum(0)
    return StepResult(
        step=t.step, metrics=metrics,
        expert_load=(total / total.sum().clamp(min=1)).tolist(),
        expert_load_per_layer=(per_layer / per_layer.sum(-1, keepdim=True).clamp(min=1)).tolist(),
        grad_norm=grad_norm, lr=lr,
    )


def micro_batches(t: Trainer, stop: int):
    """Lists of `grad_accum` micro-batches for steps t.step .. stop-1, prepared by loader workers.
    Ranks agree before each step: when one rank's data fails, every rank raises its error."""
    ga = t.cfg.grad_accum
    items = iter(loader(t.data, t.step * ga, stop * ga, workers=t.cfg.loader_workers))
    try:
        for _ in range(t.step, stop):
            group, error = [], None
            try:
                for item in islice(items, ga):
                    if isinstance(item, LoaderFailure):
                        raise ShardError(item.message)
                    group.append(item)
            except (ShardError, TrainError, OSError, ValueError) as e:
                error = e
            error = t.dist.first_error(error)
            if error is not None:
                raise error
            yield group
    finally:  # the loader's workers end now, not when an error's traceback (which holds this frame) goes
        items = None  # noqa: F841


def train(shards: list[Path], student: Path, out: Path, cfg: TrainConfig, image_root: Path | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None,
          allow_partial: bool = False, verify_shards: bool = True) -> list[dict]:
    """Train; `stop_after` ends this run early after that many steps (as a kill would, but at a
    checkpoint), for resumption tests and time-boxed runs. Returns the metrics records of this run."""
    t = setup(shards, student, out, cfg, image_root, resume, allow_partial, verify_shards)
    try:
        history = _loop(t, progress, stop_after)
    except BaseException:
        t.dist.close(clean=False)
        raise
    t.dist.close()
    return history


def _loop(t: Trainer, progress: bool, stop_after: int | None) -> list[dict]:
    from tqdm import tqdm

    cfg = t.cfg
    rank0 = t.dist.rank == 0
    if rank0 and cfg.warmup >= cfg.steps:
        print(f"lmod: warning: warmup {cfg.warmup} >= steps {cfg.steps}: the learning rate never reaches lr "
              f"{cfg.lr:g} (it peaks at {lr_at(cfg.steps - 1, cfg):.3g})", file=sys.stderr)
    if rank0 and progress:
        parts = ", ".join(f"{k} {v / 1e6:.3g}M" for k, v in sorted(t.trained_parts.items()))
        how = f", {cfg.parallel} over {t.dist.world} ranks" if t.dist.world > 1 else ""
        print(f"training {'/'.join(cfg.train)}: {parts} parameters{how}", file=sys.stderr)
    out = t.out
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = _open_metrics(out, t.step) if rank0 else None
    if rank0:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    history = []
    bar = tqdm(total=cfg.steps, initial=t.step, desc=f"train {cfg.stage}", disable=not (progress and rank0))
    t0 = time.time()
    stop_at = min(cfg.steps, t.step + stop_after) if stop_after else cfg.steps
    for group in micro_batches(t, stop_at):
        result = train_step(t, group)
        record = result.record(time.time() - t0)
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        history.append(record)
        bar.update(1)
        if t.step % cfg.log_every == 0 or t.step == cfg.steps:
            shown = {k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "kl", "dpo_loss", "pref_accuracy")}
            shown["load"] = "/".join(f"{x:.2f}" for x in result.expert_load)
            bar.set_postfix(shown)
        if (cfg.save_every and t.step % cfg.save_every == 0) or t.step == stop_at:
            gathered = full_state(t)
            if rank0:
                save_checkpoint(t.model, t.opt, t.step, out, t.encoder, gathered)
                if t.step == cfg.steps:  # the finished model, loadable from OUT itself
                    t.model.save_pretrained(str(out), state_dict=gathered[0] if gathered else None)
                    t.encoder.processor.save_pretrained(str(out))
            t.dist.barrier()
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    return history


def _open_metrics(out: Path, step: int):
    """metrics.jsonl for appending. A run killed after its last checkpoint logged steps that will be
    redone: they are dropped, as is a partial last line (a kill mid-write)."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if step and path.exists() else []
    for no, line in enumerate(lines[:-1], 1):  # only the last line can have been cut by a kill
        if _logged_step(line) == _UNREADABLE:
            raise TrainError(f"{path}:{no}: not a metrics line; the file was edited or damaged (move it away to "
                             "resume with a fresh log)")
    kept = [line for line in lines if _logged_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")


LATEST = "latest_checkpoint"
# Keys a resumed run may change: they do not alter what is computed.
_RESUMABLE_CHANGES = ("log_every", "save_every", "loader_workers", "collective_timeout_s")


def _check_resumable(out: Path, checkpoint: Path | None, cfg: TrainConfig) -> None:
    if checkpoint is None or not checkpoint.is_dir():
        raise TrainError(f"{out}: no checkpoint to resume from; drop --resume to start a new run there")
    saved_path = out / "train_config.json"
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    changed = {k: (saved[k], v) for k, v in asdict(cfg).items()
               if k in saved and saved[k] != v and k not in _RESUMABLE_CHANGES}
    if changed:
        diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        raise TrainError(f"{out}: --resume with a changed config ({diff}); resume with the run's own config "
                         f"({saved_path}), or train into another --out")


# What a model directory holds: a fresh run never writes into one (its weights would be replaced).
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "preprocessor_config.json", "processor_config.json", "chat_template.jinja", "chat_template.json")


def _check_out(out: Path, student: Path, shards: list[Path], resume: bool) -> None:
    """OUT is this run's: never the student or a dump it reads, and (without --resume) holding no
    model or checkpoint. The leftovers of a run killed before its first checkpoint (its metrics and
    config) are this run's to redo."""
    target = out.resolve()
    for what, path in [("--student", Path(student)), *[("--shards", Path(s)) for s in shards]]:
        if target == path.resolve():
            raise TrainError(f"--out {out} is the {what} directory this run reads; train into another --out")
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out}: exists and is not a directory; --out must be a training directory")
    if resume or not out.is_dir():
        return
    if (out / LATEST).exists() or any(c.is_dir() for c in out.glob("checkpoint-*")):
        raise TrainError(f"{out} holds a training run; pass --resume to continue it or choose another --out")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name in _MODEL_FILES or p.suffix == ".safetensors" or p.name.startswith("checkpoint-")
                     or p.name == "manifest.json")
    if foreign:
        raise TrainError(f"{out} holds {foreign[0]!r}: a model or another run's files, not this run's; train into "
                         "a new or empty --out (nothing there was changed)")


_UNREADABLE = 1 << 62


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return _UNREADABLE  # cut mid-write: never kept


def latest_checkpoint(out: Path) -> Path | None:
    """The last checkpoint directory under OUT (the pointer's; without the pointer, the newest
    checkpoint-STEP directory: its checksums then say whether it is complete), or None."""
    pointer = Path(out) / LATEST
    if pointer.exists():
        return Path(out) / pointer.read_text().strip()
    found = sorted(c for c in Path(out).glob("checkpoint-*") if c.is_dir())
    return found[-1] if found else None


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer steps a checkpoint directory (OUT/checkpoint-STEP) holds."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1])


def save_checkpoint(model, opt, step: int, out: Path, encoder: SampleEncoder,
                    gathered: tuple[dict, dict] | None = None) -> None:
    """OUT/checkpoint-STEP/: safetensors weights (from_pretrained-loadable), processor, optimizer and
    data position. The OUT/latest_checkpoint pointer moves only once the directory is complete, so a
    kill while saving leaves the previous checkpoint in force; older checkpoints are then removed."""
    import shutil

    from shared.fingerprint import sha256_file
    from shared.manifest import atomic_write_bytes

    ckpt = out / f"checkpoint-{step:07d}"
    model.save_pretrained(str(ckpt), state_dict=gathered[0] if gathered else None)
    encoder.processor.save_pretrained(str(ckpt))
    optimizer = {"optimizer": gathered[1], "layout": "full"} if gathered else {"optimizer": opt.state_dict()}
    with open(ckpt / "trainer_state.pt", "wb") as f:  # the largest file (2x the trainable weights): hashed as written
        writer = HashingWriter(f)
        torch.save({**optimizer, "step": step}, writer)
    sums = {p.name: sha256_file(p) for p in sorted(ckpt.iterdir())
            if p.is_file() and p.name not in (CHECKSUMS, "trainer_state.pt")}  # just written: read from the page cache
    sums["trainer_state.pt"] = writer.digest.hexdigest()
    atomic_write_bytes(ckpt / CHECKSUMS, json.dumps(sums, indent=1).encode())
    atomic_write_bytes(out / LATEST, ckpt.name.encode())
    for old in sorted(out.glob("checkpoint-*"))[:-2]:  # the previous one stays: a damaged latest falls back to it
        shutil.rmtree(old, ignore_errors=True)


CHECKSUMS = "lmod_checksums.json"


class HashingWriter(io.RawIOBase):
    """A write-only file that sha256-hashes the bytes on their way to `f`."""

    def __init__(self, f) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint directory cannot be resumed from (a file truncated or changed since it was
    written), or None."""
    from shared.fingerprint import sha256_file

    try:
        sums = json.loads((ckpt / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"{CHECKSUMS} missing or unreadable (a kill while saving?)"
    for name, digest in sums.items():
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} differs from what was saved (truncated or changed)"
    return None


def usable_checkpoint(out: Path, latest: Path) -> Path:
    """The latest checkpoint, or when it is damaged the one before it (said on stderr), else a
    one-line TrainError naming the damage."""
    problem = checkpoint_problem(latest)
    if problem is None:
        return latest
    earlier = [c for c in sorted(out.glob("checkpoint-*"), reverse=True)
               if c.is_dir() and checkpoint_step(c) < checkpoint_step(latest) and checkpoint_problem(c) is None]
    if not earlier:
        raise TrainError(f"{latest}: {problem}, and no earlier checkpoint is intact; train into a new --out")
    print(f"lmod: warning: {latest}: {problem}; resuming from {earlier[0].name}", file=sys.stderr)
    return earlier[0]


