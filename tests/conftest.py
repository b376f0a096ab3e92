"""Session fixtures: one small world, one random-init tiny teacher, and one vLLM dump shared by the
tests (a vLLM engine start costs about a minute on 2 cores, so it happens once)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

TOP_K = 8

# Test tiers (pytest markers, registered in pyproject.toml). `pytest` runs the fast tier;
# `.ci/run` runs every tier. A test is `integration` when it says so or uses a teacher dump
# fixture; `slow` (whole demo, recipes, kill/resume), `distributed` (torchrun) and `real` (the real
# instruct model of pipelines/real/smollm2.py) are marked by hand;
# every other test is `fast`.
TIERS = ("fast", "integration", "slow", "distributed", "real")
_DUMP_FIXTURES = {"vllm_dump", "hf_dump", "u8_dump", "family_dumps", "held_out_dump"}


def free_port() -> int:
    """A port no one listens on now (torchrun's master port; a fixed one collides across runs)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _seeded(request):
    """Every test starts from its own seed (a hash of its id), whatever ran before it or in which
    order: no test depends on the global RNG state another left behind."""
    import hashlib
    import random

    import numpy as np
    import torch

    seed = int(hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:8], 16)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    for item in items:
        marked = {m.name for m in item.iter_markers()} & set(TIERS)
        if not marked and _DUMP_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.integration)
            marked = {"integration"}
        if not marked:
            item.add_marker(pytest.mark.fast)


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from pipelines.toy.world import make_world

    out = tmp_path_factory.mktemp("world")
    make_world(out, seed=3, n_mimic=48, n_pref=24, n_eval=8)
    return out


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, world) -> Path:
    """Random-init tiny teacher: real architecture and tokenizer, no training (speed)."""
    from pipelines.toy.tiny_teacher import make_tiny_teacher

    out = tmp_path_factory.mktemp("teacher")
    make_tiny_teacher(world, out, steps=0)
    return out


@pytest.fixture(scope="module")
def moe_student(tmp_path_factory, teacher) -> Path:
    """The tiny dense student of the teacher, upcycled (4 experts, top-2), once per test module."""
    from student_train.moe import make_dense_student, upcycle

    root = tmp_path_factory.mktemp("student")
    make_dense_student(teacher, root / "dense")
    upcycle(root / "dense", root / "moe")
    return root / "moe"


def dump(world: Path, teacher: Path, out: Path, backend: str, shards: int = 3, top_k: int = TOP_K,
         encoding: str = "f32", **kw):
    """Exact (f32) shards unless told: the tests of stored values compare them at 1e-4; the compact
    default encoding has its own fixture and tests."""
    from teacher_dump.run import DumpConfig, dump_teacher

    cfg = DumpConfig(model=teacher, out=out, mimic_data=world / "mimic.jsonl", pref_data=world / "pref.jsonl",
                     shards=shards, top_k=top_k, backend=backend, max_model_len=256, progress=False,
                     encoding=encoding, **kw)
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


@pytest.fixture(scope="session")
def u8_dump(tmp_path_factory, world, teacher) -> Path:
    """The default, compact encoding (8-bit log-probs, delta-coded ids), same teacher and data as hf_dump."""
    out = tmp_path_factory.mktemp("dump_u8")
    dump(world, teacher, out, "hf", encoding="u8")
    return out


# Real families' tiny stand-ins (shared by test_families and test_recipes).
SIZES = [(64, 64), (128, 64), (64, 128), (112, 112)]


@pytest.fixture(scope="session")
def family_world(tmp_path_factory) -> Path:
    """A small world whose images come in several sizes (image-token counts then differ)."""
    from pipelines.toy.world import make_world

    out = tmp_path_factory.mktemp("family_world")
    make_world(out, seed=5, n_mimic=12, n_pref=6, n_eval=4)
    for name in ("mimic.jsonl", "pref.jsonl"):
        rows = [json.loads(line) for line in (out / name).read_text().splitlines()]
        for i, row in enumerate(rows):
            size = SIZES[i % len(SIZES)]
            resized = f"images/{Path(row['image']).stem}-{size[0]}x{size[1]}.png"
            Image.open(out / row["image"]).convert("RGB").resize(size).save(out / resized)
            row["image"] = resized
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="session")
def family_tok(tmp_path_factory):
    from pipelines.toy.tiny_families import family_tokenizer

    return family_tokenizer(tmp_path_factory.mktemp("family_tokenizer"))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, family_tok) -> dict[str, Path]:
    from pipelines.toy.tiny_families import TINY_FAMILIES, build_tiny_family

    root = tmp_path_factory.mktemp("families")
    tok = family_tok
    models = {f: build_tiny_family(f, root / f, tok) for f in TINY_FAMILIES}
    # Dense student bases: another seed, a narrower FFN.
    models.update({f"{f}-base": build_tiny_family(f, root / f"{f}-base", tok, intermediate=192, seed=1)
                   for f in ("smolvlm", "llava_next")})
    return models


def _dump(model: Path, world: Path, out: Path, backend: str):
    from teacher_dump.run import DumpConfig, dump_teacher

    return dump_teacher(DumpConfig(model=model, out=out, mimic_data=world / "mimic.jsonl",
                                   pref_data=world / "pref.jsonl", shards=2, top_k=8, backend=backend,
                                   max_model_len=512, progress=False, encoding="f32"))  # values compared at 1e-4


@pytest.fixture(scope="session")
def family_dumps(tmp_path_factory, family_models, family_world) -> dict[tuple[str, str], Path]:
    from pipelines.toy.tiny_families import TINY_FAMILIES

    dumps = {}
    for family in TINY_FAMILIES:
        model = family_models[family]
        backends = ("hf",) if family == "llava_next" else ("hf", "vllm")
        for backend in backends:
            out = tmp_path_factory.mktemp(f"dump_{family}_{backend}")
            _dump(model, family_world, out, backend)
            dumps[family, backend] = out
    return dumps
