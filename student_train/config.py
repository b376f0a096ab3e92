"""`TrainConfig`: what a training run does, validated once before anything loads (the library
gives a notebook or the demo the same one-line errors as the CLI)."""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from shared.models import DEVICES
from student_train.parts import DEFAULT_TRAIN, PARTS


class TrainError(RuntimeError):
    """Training cannot go on; the message says at which step and why."""


@dataclass
class TrainConfig:
    """One flat set of fields, grouped below by concern; the YAML keys are the field names (a flat
    file reads like a recipe, and one `__post_init__` validates every key once)."""

    # -- what runs, how long, on what
    stage: Literal["mimic", "pref"] = "mimic"  # mimic: KL to the stored teacher; pref: DPO-style, teacher as reference
    steps: int = 200  # optimizer steps
    seed: int = 0  # data order and initialisation: same seed, same run
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda; under torchrun each rank takes its own GPU
    # bfloat16: the weights compute in bf16 (every matmul, the MoE experts' included) while the
    # optimizer keeps float32 masters and gradients are summed and reduced in float32
    # (student_train/precision.py); the losses run in float32. float16 would need loss scaling.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Under torchrun: ddp replicates the model on every rank; fsdp shards each language-model layer and
    # the rest (FSDP2 fully_shard) for students whose weights + gradients + Adam do not fit one device.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # Recompute each decoder layer's activations in backward instead of keeping them (non-reentrant
    # torch.utils.checkpoint per layer, transformers' gradient checkpointing): one more forward of
    # the body per step for a fraction of the activation memory (tests/test_train.py measures it).
    activation_checkpointing: bool = False
    # Under torchrun: how long a rank waits in a collective before the run stops with an error. The
    # others wait while rank 0 writes a checkpoint (weights + 2x trainable parameters of AdamW state):
    # raise it for large students on slow storage.
    collective_timeout_s: int = 1800
    # What trains (student_train/parts.py): vision, projector, language, experts, router, or [all].
    # The paper's default for the distillation stages: the MoE experts and routers, vision frozen.
    train: list[str] = field(default_factory=lambda: list(DEFAULT_TRAIN))

    # -- optimisation
    batch_size: int = 16  # examples per micro-batch, over all ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # AdamW peak learning rate (linear warm-up, then cosine to 0)
    warmup: int = 20  # warm-up steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this
    aux_loss_coef: float = 0.01  # MoE: Switch load balancing
    z_loss_coef: float = 0.0  # MoE: router z-loss

    # -- mimic distillation
    kd_weight: float = 1.0  # 0 with ce_weight 1: the labels-only (SFT) baseline on the same data
    kd: Literal["topk", "sampled"] = "topk"  # sampled: RS-KD on the dump's --sample draws (unbiased)
    kd_tail: Literal["renorm", "rest"] = "rest"  # for kd: topk
    temperature: float = 1.0  # kd_tail renorm only: both distributions at this temperature (loss x T^2)
    # forward: KL(teacher || student). reverse (KL(student || teacher), mode-seeking, as in on-policy
    # distillation) and jsd (Jensen-Shannon) are computed over the k + 1 buckets of kd_tail: rest,
    # lower bounds of their full-vocabulary values (student_train/losses.py); the `kl` metric is then
    # that divergence.
    kd_divergence: Literal["forward", "reverse", "jsd"] = "forward"
    ce_weight: float = 0.0  # cross-entropy on the stored response tokens, added to kd_weight x KL
    loss_chunk: int = 256  # tokens per chunk of the KL / log-prob computation (bounds [N, V] buffers)
    # A student with another tokenizer than the dump's teacher (student_train/cross_tokenizer.py): the
    # run is refused when fewer of its label positions than this share pair with a teacher position.
    min_paired: float = 0.5
    # Teacher tokens the student lacks: their mass to the student's first token of their text
    # (first_token), or to the rest bucket (exact); shared/token_alignment.py. Measured in
    # pipelines/benchmarks/bench_cross_tokenizer.py: exact misleads a student that spells words in more pieces.
    cross_vocab: Literal["exact", "first_token"] = "first_token"

    # -- preference distillation (the teacher is the reference model)
    pref_loss: Literal["dpo", "ipo", "kto_pair"] = "dpo"
    beta: float = 0.1  # strength of the preference loss (DPO beta)
    label_smoothing: float = 0.0  # conservative DPO: the share of pairs assumed mislabelled
    pref_ce_weight: float = 0.0  # CE on the chosen answer during preference distillation

    # -- data loading, logging, checkpoints
    loader_workers: int = 2  # DataLoader processes reading, decoding and encoding batches (0: in-process)
    shuffle_window: int = 8  # row groups shuffled together (and cached per loader worker)
    # Share of every batch drawn from each --dump, in the order given (e.g. [0.5, 0.5]; GKD's
    # on-policy fraction); a smaller dump is then repeated more often. null: all rows shuffled together.
    dump_mix: list[float] | None = None
    log_every: int = 10  # progress-bar updates every N steps (metrics.jsonl has every step)
    save_every: int = 0  # 0: only at the end

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> TrainConfig:
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ValueError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', None) or e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig keys")
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
        given = {k: v for k, v in overrides.items() if v is not None}
        if "stage" in raw and "stage" in given and raw["stage"] != given["stage"]:
            stage = given["stage"]
            raise ValueError(f"{path}: a {raw['stage']} config (stage: {raw['stage']}) given with --stage {stage}; "
                             f"use a {stage} config (pipelines/configs/{stage}.yaml)")
        raw.update(given)
        try:
            return cls(**raw)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def __post_init__(self) -> None:
        """Checked once, before any model or shard is loaded."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            if f.name == "train":
                if isinstance(value, str):
                    value = [value]
                    setattr(self, f.name, value)
                if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                    raise ValueError(f"train: {value!r}; a list of {' | '.join(PARTS)}, or [all]")
                bad = sorted(set(value) - set(PARTS) - {"all"})
                if bad or ("all" in value and len(value) > 1):
                    raise ValueError(f"train: {value!r}; use any of {list(PARTS)}, or [all] alone")
                continue
            if f.name == "dump_mix":
                if value is not None:
                    setattr(self, f.name, _shares(value))
                continue
            if typing.get_origin(hint) is Literal:
                allowed = typing.get_args(hint)
                if value not in allowed:
                    raise ValueError(f"{f.name}: {value!r}; use {' | '.join(allowed)}")
                continue
            ok = isinstance(value, hint) and (hint is bool or not isinstance(value, bool))
            if hint is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                ok = True
            if not ok:
                tip = ""
                if isinstance(value, str) and hint is float:  # YAML 1.1 reads 1e-3 (no dot) as text
                    tip = " (YAML reads 1e-3 as text: write 1.0e-3)"
                raise ValueError(f"{f.name}: {value!r} is not {'an' if hint is int else 'a'} {hint.__name__}{tip}")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}: {value} is not a finite number")
        if not re.fullmatch(DEVICES, self.device):
            raise ValueError(f"device: {self.device!r}; use auto | cpu | cuda | cuda:N")
        for name in ("steps", "batch_size", "grad_accum", "log_every", "shuffle_window", "loss_chunk",
                     "collective_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 1")
        for name in ("warmup", "save_every", "weight_decay", "kd_weight", "ce_weight", "pref_ce_weight",
                     "aux_loss_coef", "z_loss_coef", "label_smoothing", "loader_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be >= 0")
        for name in ("lr", "beta", "temperature", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: {getattr(self, name)} must be > 0")
        if self.dump_mix is not None:
            for i, (share, n) in enumerate(zip(self.dump_mix, rows_per_source(self.batch_size, self.dump_mix))):
                if n == 0:
                    raise ValueError(f"dump_mix: the share {share:g} of --dump {i + 1} is less than one row of "
                                     f"batch_size {self.batch_size}; raise batch_size or the share")
        if self.kd_divergence != "forward" and (self.kd_tail != "rest" or self.kd != "topk"):
            raise ValueError(f"kd_divergence: {self.kd_divergence} is computed over the top-k and the rest bucket; "
                             "use kd: topk with kd_tail: rest")
        if self.kd_tail == "rest" and self.temperature != 1.0:
            raise ValueError("temperature: the rest bucket is stored at temperature 1; use kd_tail: renorm")
        if not 0.0 <= self.min_paired <= 1.0:
            raise ValueError(f"min_paired: {self.min_paired} must be within [0, 1]")
        if self.label_smoothing >= 0.5:
            raise ValueError(f"label_smoothing: {self.label_smoothing} must be < 0.5")


def _shares(value: Any) -> list[float]:
    """dump_mix: positive numbers that sum to 1, one per --dump."""
    if not (isinstance(value, list) and len(value) >= 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"dump_mix: {value!r}; a list of one share per --dump (at least two), e.g. [0.5, 0.5]")
    shares = [float(v) for v in value]
    if not all(math.isfinite(v) and v > 0 for v in shares) or abs(sum(shares) - 1.0) > 1e-6:
        raise ValueError(f"dump_mix: {value!r}; the shares must be > 0 and sum to 1")
    return shares


def rows_per_source(batch_size: int, shares: Sequence[float]) -> list[int]:
    """A batch's rows per source for `shares` (summing to 1): the largest-remainder rounding of
    batch_size * share, ties to the earlier source."""
    exact = [batch_size * s for s in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: batch_size - sum(counts)]:
        counts[i] += 1
    return counts
