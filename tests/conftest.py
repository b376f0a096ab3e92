"""Session fixtures: one small world, one random-init tiny teacher, and one vLLM dump shared by the
tests (a vLLM engine start costs about a minute on 2 cores, so it happens once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TOP_K = 8


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from shared.world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, seed=3, n_mimic=48, n_pref=24, n_eval=8)
    return out


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, world) -> Path:
    """Random-init tiny teacher: real architecture and tokenizer, no training (speed)."""
    from teacher_dump.tiny_teacher import make_tiny_teacher

    out = tmp_path_factory.mktemp("teacher")
    make_tiny_teacher(world, out, steps=0)
    return out


def dump(world: Path, teacher: Path, out: Path, backend: str, shards: int = 3, top_k: int = TOP_K, **kw):
    from teacher_dump.run import DumpConfig, dump_teacher

    cfg = DumpConfig(model=teacher, out=out, mimic_data=world / "mimic.jsonl", pref_data=world / "pref.jsonl",
                     shards=shards, top_k=top_k, backend=backend, max_model_len=256, progress=False, **kw)
    return dump_teacher(cfg)


@pytest.fixture(scope="session")
def vllm_dump(tmp_path_factory, world, teacher) -> Path:
    """A real vLLM engine in a Ray actor, on the CPU, with images."""
    out = tmp_path_factory.mktemp("dump_vllm")
    dump(world, teacher, out, "vllm")
    return out


@pytest.fixture(scope="session")
def hf_dump(tmp_path_factory, world, teacher) -> Path:
    out = tmp_path_factory.mktemp("dump_hf")
    dump(world, teacher, out, "hf")
    return out
