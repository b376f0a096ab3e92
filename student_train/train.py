"""`lmod train --stage mimic|pref`: the student trains from teacher shards only.

One loop for both stages: the batch order is a pure function of (seed, step), so a resumed run
continues exactly where the checkpoint left it.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from shared.mllm import SampleEncoder, batch_inputs, load_encoder, moe_routers
from student_train.data import (
    check_shards,
    encode_mimic,
    encode_pref,
    label_positions,
    load_mimic,
    load_pref,
    sequence_logprobs,
)
from student_train.losses import load_balancing_loss, preference_loss, router_z_loss, sparse_kl


class TrainError(RuntimeError):
    """Training cannot go on; the message says at which step and why."""


@dataclass
class TrainConfig:
    stage: str = "mimic"  # mimic | pref
    steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    kd_weight: float = 1.0  # 0 with ce_weight 1: the labels-only (SFT) baseline on the same data
    kd_tail: str = "rest"  # renorm | rest
    temperature: float = 1.0
    ce_weight: float = 0.0
    pref_loss: str = "dpo"  # dpo | ipo | kto_pair
    beta: float = 0.1
    label_smoothing: float = 0.0
    pref_ce_weight: float = 0.0  # CE on the chosen answer during preference distillation
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    device: str = "auto"
    seed: int = 0
    save_every: int = 0  # 0: only at the end
    log_every: int = 10

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        import yaml

        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        raw.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __post_init__(self) -> None:
        """Checked once, before any model or shard is loaded."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                ok = True
            if not ok:
                hint = ""
                if isinstance(value, str) and kind is float:  # YAML 1.1 reads 1e-3 (no dot) as text
                    hint = " (YAML reads 1e-3 as text: write 1.0e-3)"
                raise ValueError(f"{f.name}: {value!r} is not {'a' if kind is not int else 'an'} {kind.__name__}{hint}")
        choices = {"stage": ("mimic", "pref"), "kd_tail": ("renorm", "rest"), "pref_loss": ("dpo", "ipo", "kto_pair"),
                   # float16 would need loss scaling (a GradScaler); bfloat16 autocast does not.
                   "dtype": ("float32", "bfloat16")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: {getattr(self, name)!r}; use {' | '.join(allowed)}")
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        for name in ("warmup", "save_every", "weight_decay", "kd_weight", "ce_weight", "pref_ce_weight",
                     "aux_loss_coef", "z_loss_coef", "label_smoothing"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 0")
        for name in ("lr", "beta", "temperature", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be > 0")


class RouterTap:
    """Collects router logits of every MoE layer during a forward (the MLLM wrapper drops them)."""

    def __init__(self, model: torch.nn.Module):
        self.logits: list[torch.Tensor] = []
        self.handles = []
        for module in moe_routers(model):
            self.handles.append(module.register_forward_hook(lambda m, i, o: self.logits.append(o[0])))
        text = model.config.text_config
        self.top_k = getattr(text, "num_experts_per_tok", 1)
        self.layer_loads: list[list[float]] = []

    def losses(self, token_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
        keep = token_mask.reshape(-1).bool()
        if not self.logits:
            zero = torch.zeros((), device=token_mask.device)
            return zero, zero, []
        aux = torch.stack([load_balancing_loss(lg[keep], self.top_k) for lg in self.logits]).mean()
        z = torch.stack([router_z_loss(lg[keep]) for lg in self.logits]).mean()
        n_experts = self.logits[0].shape[-1]
        per_layer = torch.stack([torch.bincount(lg[keep].topk(self.top_k, -1).indices.reshape(-1),
                                                minlength=n_experts).float() for lg in self.logits])
        self.layer_loads = (per_layer / per_layer.sum(-1, keepdim=True)).tolist()  # [layer][expert], for plots
        load = per_layer.sum(0)
        self.logits = []
        return aux, z, (load / load.sum()).tolist()


@dataclass
class Dist:
    """Data-parallel position under torchrun (WORLD_SIZE, RANK, LOCAL_RANK); 1 process otherwise."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def setup(cls, device: str) -> Dist:
        import os

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as td

        if not td.is_initialized():
            td.init_process_group(backend="nccl" if device == "cuda" else "gloo")
        return cls(td.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as td

        t = torch.tensor([value], dtype=torch.float64)
        td.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batch_indices(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Examples of global micro-batch `step`: epoch-wise permutations of range(n), from the seed."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = list(range(n))
        random.Random(seed * 100003 + epoch).shuffle(perm)
        out.extend(perm[offset : offset + batch - len(out)])
    return out


def train(shards: list[Path], student: Path, out: Path, cfg: TrainConfig, image_root: Path | None = None,
          resume: bool = False, progress: bool = True, stop_after: int | None = None,
          allow_partial: bool = False) -> list[dict]:
    """Train; `stop_after` ends this run early after that many steps (as a kill would, but at a
    checkpoint), for resumption tests and time-boxed runs."""
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText

    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dist = Dist.setup(device)
    if device == "cuda" and dist.world > 1:
        device = f"cuda:{dist.local_rank}"
        torch.cuda.set_device(device)
    if cfg.batch_size % dist.world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {dist.world} ranks")
    progress = progress and dist.rank == 0
    out = Path(out)
    checkpoint = latest_checkpoint(out) if resume else None
    if resume:
        _check_resumable(out, checkpoint, cfg)
    start_dir = checkpoint or student
    encoder = load_encoder(student)
    files = check_shards(shards, cfg.stage, encoder, allow_partial=allow_partial)
    examples = (load_mimic if cfg.stage == "mimic" else load_pref)(files, image_root)
    torch.manual_seed(cfg.seed)
    model = AutoModelForImageTextToText.from_pretrained(str(start_dir), dtype=torch.float32).to(device)
    model.train()
    tap = RouterTap(model)
    # DDP averages gradients over ranks; the losses below are normalised by global counts so that
    # N ranks compute what one process does on the same global batch.
    forward_model = torch.nn.parallel.DistributedDataParallel(model) if dist.world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.startswith("cuda"))
    step = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
    out.mkdir(parents=True, exist_ok=True)
    if dist.rank == 0:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    metrics_file = None
    if dist.rank == 0:
        metrics_path = out / "metrics.jsonl"
        # A run killed after its last checkpoint logged steps that will be redone: drop them.
        # A kill mid-write leaves a partial last line: it goes too.
        kept = [line for line in (metrics_path.read_text().splitlines() if step and metrics_path.exists() else [])
                if _logged_step(line) <= step]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        metrics_file = open(metrics_path, "a")
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16,
                              enabled=cfg.dtype == "bfloat16")
    history = []
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.stage}", disable=not progress)
    t0 = time.time()
    stop_at = min(cfg.steps, step + stop_after) if stop_after else cfg.steps
    while step < stop_at:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        logs: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            idx = _batch_indices(step * cfg.grad_accum + micro, len(examples), cfg.batch_size, cfg.seed)
            batch = [examples[i] for i in idx[dist.rank :: dist.world]]
            with autocast:
                loss, parts = (_mimic_loss if cfg.stage == "mimic" else _pref_loss)(
                    forward_model, encoder, batch, cfg, tap, device, dist)
            if not torch.isfinite(loss):  # stop before a NaN reaches the weights or a checkpoint
                terms = ", ".join(f"{k}={v:.4g}" for k, v in parts.items() if isinstance(v, float))
                raise TrainError(f"step {step + 1}: the loss is not finite ({terms}); nothing of this step was "
                                 "applied. Check the shards (`lmod shards verify`) and the lr, then --resume")
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                if isinstance(v, float):
                    logs[k] = logs.get(k, 0.0) + dist.sum(v) / dist.world / cfg.grad_accum
            logs["expert_load"] = parts.get("expert_load", [])
            logs["expert_load_per_layer"] = tap.layer_loads
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, **logs, "grad_norm": float(grad_norm), "lr": _lr_at(step - 1, cfg),
                  "elapsed_s": round(time.time() - t0, 3)}
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        history.append(record)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            shown = {k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "kl", "dpo_loss", "pref_accuracy")}
            shown["load"] = "/".join(f"{x:.2f}" for x in logs["expert_load"])
            bar.set_postfix(shown)
        if (cfg.save_every and step % cfg.save_every == 0) or step == stop_at:
            if dist.rank == 0:
                save_checkpoint(model, opt, step, out, encoder)
                if step == cfg.steps:  # the finished model, loadable from OUT itself
                    model.save_pretrained(str(out))
                    encoder.processor.save_pretrained(str(out))
            dist.barrier()
    bar.close()
    if metrics_file is not None:
        metrics_file.close()
    return history


LATEST = "latest_checkpoint"
# Keys a resumed run may change: they do not alter what is computed.
_RESUMABLE_CHANGES = ("log_every", "save_every")


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


def _logged_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # unreadable (cut mid-write): never kept


def latest_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint directory under OUT, or None."""
    pointer = Path(out) / LATEST
    return Path(out) / pointer.read_text().strip() if pointer.exists() else None


def save_checkpoint(model, opt, step: int, out: Path, encoder: SampleEncoder) -> None:
    """OUT/checkpoint-STEP/: safetensors weights (from_pretrained-loadable), processor, optimizer and
    data position. The OUT/latest_checkpoint pointer moves only once the directory is complete, so a
    kill while saving leaves the previous checkpoint in force; older checkpoints are then removed."""
    import shutil

    from shared.manifest import atomic_write_bytes

    ckpt = out / f"checkpoint-{step:07d}"
    model.save_pretrained(str(ckpt))
    encoder.processor.save_pretrained(str(ckpt))
    torch.save({"optimizer": opt.state_dict(), "step": step}, ckpt / "trainer_state.pt")
    atomic_write_bytes(out / LATEST, ckpt.name.encode())
    for old in out.glob("checkpoint-*"):
        if old != ckpt:
            shutil.rmtree(old, ignore_errors=True)


def _mimic_loss(model, encoder, batch, cfg: TrainConfig, tap: RouterTap, device: str, dist: Dist | None = None):
    encoded = [encode_mimic(encoder, e) for e in batch]
    inputs = batch_inputs(encoder, [e.ids for e in encoded], [e.image for e in encoded], device)
    logits = model(**inputs).logits
    rows, cols = [], []
    for b, e in enumerate(encoded):
        positions = label_positions(e)
        rows.extend([b] * len(positions))
        cols.extend(p - 1 for p in positions)  # logits at p-1 predict the token at p
    # Rows of a padded embedding beyond the shared vocabulary are no tokens: they get no mass.
    student = logits[torch.tensor(rows), torch.tensor(cols), : len(encoder.tokenizer)]  # [N, V]
    targets = inputs["input_ids"][torch.tensor(rows), torch.tensor(cols) + 1]
    topk_ids = torch.tensor([t for e in batch for t in e.topk_ids], device=device)
    topk_lp = torch.tensor([t for e in batch for t in e.topk_logprobs], device=device)
    # A teacher with padded embedding rows may put (tiny) mass on ids no tokenizer produces: it
    # goes to the rest, not to a student logit. Such entries point at the row's top-1 id instead
    # (a duplicate of zero weight changes nothing).
    outside = topk_ids >= student.shape[-1]
    first = topk_ids[:, :1].masked_fill(outside[:, :1], 0)
    topk_ids, topk_lp = torch.where(outside, first, topk_ids), topk_lp.masked_fill(outside, float("-inf"))
    dist = dist or Dist()
    per_rank_tokens = dist.sum(float(len(rows))) / dist.world  # token mean over the global batch
    kl = sparse_kl(student, topk_ids, topk_lp, tail=cfg.kd_tail, temperature=cfg.temperature).sum() / per_rank_tokens
    ce = torch.nn.functional.cross_entropy(student.float(), targets, reduction="sum") / per_rank_tokens
    aux, z, load = tap.losses(inputs["attention_mask"])
    loss = cfg.kd_weight * kl + cfg.ce_weight * ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
    return loss, {"loss": loss.item(), "kl": kl.item(), "ce": ce.item(), "aux_loss": aux.item(),
                  "tokens": float(len(rows)), "expert_load": load}


def _pref_loss(model, encoder, batch, cfg: TrainConfig, tap: RouterTap, device: str, dist: Dist | None = None):
    pairs = [encode_pref(encoder, e) for e in batch]
    encoded = [c for c, _ in pairs] + [r for _, r in pairs]
    inputs = batch_inputs(encoder, [e.ids for e in encoded], [e.image for e in encoded], device)
    logits = model(**inputs).logits
    positions = [label_positions(e) for e in encoded]
    logps = sequence_logprobs(logits[..., : len(encoder.tokenizer)], inputs["input_ids"], positions)
    n = len(batch)
    ref_c = torch.tensor([e.ref_chosen for e in batch], device=device)
    ref_r = torch.tensor([e.ref_rejected for e in batch], device=device)
    losses, r_c, r_r = preference_loss(logps[:n], logps[n:], ref_c, ref_r, beta=cfg.beta,
                                       loss_type=cfg.pref_loss, label_smoothing=cfg.label_smoothing)
    dpo = losses.mean()
    dist = dist or Dist()
    per_rank_tokens = dist.sum(float(sum(len(p) for p in positions[:n]))) / dist.world
    ce = -logps[:n].sum() / per_rank_tokens
    aux, z, load = tap.losses(inputs["attention_mask"])
    loss = dpo + cfg.pref_ce_weight * ce + cfg.aux_loss_coef * aux + cfg.z_loss_coef * z
    return loss, {"loss": loss.item(), "dpo_loss": dpo.item(), "pref_accuracy": (r_c > r_r).float().mean().item(),
                  "reward_margin": (r_c - r_r).mean().item(), "ce": ce.item(), "aux_loss": aux.item(),
                  "expert_load": load}
