"""Mixed precision for the student: parameters computed in bfloat16, kept and updated in float32.

Autocast alone is not enough for an MoE student: transformers' grouped expert kernels cast their
input to the weights' dtype, so float32 weights make every expert matmul run in float32. Here the
weights themselves are bfloat16 for the forward and backward (every kernel sees bf16), while the
optimizer holds the float32 masters and gradients are accumulated and reduced in float32:

- one process: `bf16_weights` swaps each parameter's storage to a bf16 copy around a micro-batch's
  forward and backward, and adds the bf16 gradient into the float32 `.grad` after it;
- data parallel (`parallel: ddp`): the same swap on every rank, and the float32 gradients averaged
  over ranks once per step (`train.Dist.average_grads`) instead of by a DDP wrapper, whose reducer
  buckets are typed by the parameters and whose own mixed-precision mode is CUDA-only and experimental;
- FSDP2: `MixedPrecisionPolicy` (`fsdp_kwargs`): bf16 all-gathers, float32 reduce-scatter.

The losses and the fused output head compute in float32 in every case (`OutputHead.dtype`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    """The dtype the student's weights compute in for a config's `dtype`."""
    return _DTYPES[name]


def fsdp_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """fully_shard arguments for computing in `dtype` (float32 shards, float32 reduce-scatter)."""
    if dtype == torch.float32:
        return {}
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return {"mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}


@contextmanager
def bf16_weights(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[None]:
    """Within the block the model's floating-point parameters are `dtype` copies of their float32
    values; on leaving, the float32 values are back and the gradient computed inside is added, in
    float32, to the `.grad` accumulated so far (so gradient accumulation sums in float32). Run one
    micro-batch's forward and backward inside. Buffers (rotary frequencies) are left as they are."""
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]
    masters = [p.data for p in params]
    earlier = [p.grad for p in params]
    for p in params:
        p.grad = None
        p.data = p.data.to(dtype)
    try:
        yield
    finally:
        for p, master, before in zip(params, masters, earlier, strict=True):
            new, p.grad = p.grad, None  # a bf16 .grad cannot stay on a float32 parameter
            p.data = master
            if new is not None:
                new = new.float()
                p.grad = new if before is None else before.add_(new)
            else:
                p.grad = before
