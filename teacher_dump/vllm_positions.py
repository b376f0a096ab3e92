"""vLLM returns the final hidden states of the positions a dump scores, and no others.

The pooling runner's `ALL` pooler hands back every position's hidden state ([T, H] per prompt,
T dominated by image tokens in real MLLMs: 14 MB per 2,048-token prompt at H = 3,584 in bf16),
which the worker would copy out of the engine only to keep a few rows. `SelectedPositions` wraps
the model's pooler inside the engine and keeps only the rows named by the request
(`PoolingParams.extra_kwargs["lmod_rows"]`), so what leaves the engine is [P, H] for the P scored
positions. It is installed through vLLM's worker extension (`worker_extension_cls`, a method
called by name with `collective_rpc`): no pickled code crosses the process boundary."""

from __future__ import annotations

from typing import Any

import torch

ROWS_KEY = "lmod_rows"


class SelectedPositions(torch.nn.Module):
    """The model's own pooler, then per finished request only the rows it asked for."""

    def __init__(self, pooler: torch.nn.Module):
        super().__init__()
        self.inner = pooler

    def get_supported_tasks(self) -> Any:
        return self.inner.get_supported_tasks()

    def get_pooling_updates(self, task: Any) -> Any:
        return self.inner.get_pooling_updates(task)

    def forward(self, hidden_states: torch.Tensor, pooling_metadata: Any) -> list[torch.Tensor | None]:
        pooled = self.inner(hidden_states=hidden_states, pooling_metadata=pooling_metadata)
        out: list[torch.Tensor | None] = []
        for data, params in zip(pooled, pooling_metadata.pooling_params, strict=True):
            rows = (params.extra_kwargs or {}).get(ROWS_KEY)
            if data is not None and rows is not None:
                if rows and max(rows) >= data.shape[0]:  # vLLM expanded the prompt shorter than lmod did:
                    data = data[:0]  # no rows; the worker compares the prompts and says what differs
                else:
                    data = data[torch.as_tensor(rows, device=data.device)]  # a gather: a new tensor
            out.append(data)
        return out


class PositionPoolerExtension:
    """Mixed into vLLM's worker class (`LLM(worker_extension_cls=...)`)."""

    def lmod_select_positions(self) -> bool:
        model = self.model_runner.model  # type: ignore[attr-defined]
        pooler = getattr(model, "pooler", None)
        if pooler is None:
            raise RuntimeError(f"vLLM's {type(model).__name__} has no pooler to restrict to the scored positions; "
                               "dump with --vllm-scoring logprobs")
        if not isinstance(pooler, SelectedPositions):
            model.pooler = SelectedPositions(pooler)
        return True
