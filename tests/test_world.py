"""The tiny world is deterministic and has the formats and the biases it promises."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipelines.toy.world import COLORS, SHAPES, make_world


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    make_world(tmp_path / "a", seed=5, n_mimic=20, n_pref=10, n_eval=10)
    make_world(tmp_path / "b", seed=5, n_mimic=20, n_pref=10, n_eval=10)
    make_world(tmp_path / "c", seed=6, n_mimic=20, n_pref=10, n_eval=10)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["mimic.jsonl"] != _digest(tmp_path / "c")["mimic.jsonl"]


def test_formats(world):
    from PIL import Image

    mimic = [json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()]
    for rec in mimic:
        turns = rec["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert Image.open(world / rec["image"]).size == (64, 64)
    assert max(len(r["conversations"]) for r in mimic) > 2  # multi-turn conversations exist
    pref = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()]
    assert all(r["chosen"] != r["rejected"] for r in pref)


def test_pope_is_balanced_and_rejected_answers_hallucinate(tmp_path):
    make_world(tmp_path, seed=1, n_mimic=0, n_pref=200, n_eval=200)
    ev = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    pope = [r for r in ev if r["type"] == "pope"]
    assert len(pope) == 100 and sum(r["answer"] == "yes" for r in pope) == 50
    pref = [json.loads(line) for line in (tmp_path / "pref.jsonl").read_text().splitlines()]
    captions = [r for r in pref if r["question"] == "Describe the image."]
    assert captions
    for r in captions:
        names = {f"{c} {s}" for c in COLORS for s in SHAPES}
        chosen = {n for n in names if n in r["chosen"]}
        rejected = {n for n in names if n in r["rejected"]}
        assert rejected - chosen, "a rejected caption names something not in the picture"
