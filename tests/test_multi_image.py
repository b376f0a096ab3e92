"""Several images per sample (multi-image conversations, as LLaVA-OneVision and Idefics3/SmolVLM take
them): validated, expanded in placeholder order, scored, stored and trained on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from shared.mllm import load_encoder
from shared.prompt import llava_messages
from shared.shards import shard_paths, verify_dump
from teacher_dump.inputs import Rejection, check_row

TWO = "<image>\n<image>\n"


def _two_image_world(src: Path, out: Path, n: int = 6) -> Path:
    """Records of `src` with a second image in front of their own (another record's), both placed;
    conversations cut to their first exchange."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():
        shutil.copytree(src / "images", out / "images")
    for name, n_rows in (("mimic.jsonl", n), ("pref.jsonl", n // 2)):
        rows = [json.loads(line) for line in (src / name).read_text().splitlines()][: n_rows + 1]
        got = []
        for a, b in zip(rows, rows[1:]):
            rec = dict(b, image=[a["image"], b["image"]])
            if "conversations" in rec:
                turns = [dict(t) for t in b["conversations"][:2]]  # one exchange: the response ends the sequence
                turns[0]["value"] = TWO + turns[0]["value"].replace("<image>\n", "").replace("<image>", "")
                rec["conversations"] = turns
            else:
                rec["question"] = TWO + b["question"].replace("<image>\n", "").replace("<image>", "")
            got.append(rec)
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in got))
    return out


def test_images_expand_in_placeholder_order(family_models):
    enc = load_encoder(family_models["smolvlm"])
    small, wide = Image.new("RGB", (64, 64), (200, 0, 0)), Image.new("RGB", (128, 64), (0, 200, 0))
    a, b = enc.image_features(small), enc.image_features(wide)
    assert len(a.ids) != len(b.ids)  # image splitting: the two runs differ
    turns = [{"from": "human", "value": TWO + "which is wider?"}, {"from": "gpt", "value": "the second"}]
    got = enc.encode(llava_messages(turns, 2), [a, b])
    p, q = [i for i, t in enumerate(got.prompt_ids) if t == enc.image_token_id]
    assert got.ids == got.prompt_ids[:p] + a.ids + got.prompt_ids[p + 1 : q] + b.ids + got.prompt_ids[q + 1 :]
    assert sum(got.response_mask) == sum(enc.encode(llava_messages(turns, 2), [b, a]).response_mask)
    assert got.ids != enc.encode(llava_messages(turns, 2), [b, a]).ids
    with pytest.raises(ValueError, match="2 image tokens .* expected 1"):
        enc.encode(llava_messages(turns, 2), [a])
    # no placeholders: every image goes before the first question
    plain = [{"from": "human", "value": "which is wider?"}, {"from": "gpt", "value": "the second"}]
    assert [c["type"] for c in llava_messages(plain, 2)[0]["content"]] == ["image", "image", "text"]
    blip = load_encoder(family_models["blip2"])
    with pytest.raises(ValueError, match="takes one image per sample, not 2"):
        blip.encode(llava_messages(plain, 2), [blip.image_features(small)] * 2)


def test_multi_image_records_are_checked_per_image(world, tmp_path):
    rows = [json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()][:2]
    conv = [{"from": "human", "value": TWO + "same?"}, {"from": "gpt", "value": "no"}]
    good = {"id": "a", "images": [rows[0]["image"], rows[1]["image"]], "conversations": conv}
    rec = check_row(world / "mimic.jsonl", "mimic", 0, good, None, world)
    assert not isinstance(rec, Rejection) and [i.ref for i in rec.images] == [rows[0]["image"], rows[1]["image"]]
    cases = [
        ({**good, "images": [rows[0]["image"]]}, "2 <image> placeholders for 1 images"),
        ({**good, "images": [rows[0]["image"], "images/nope.png"]}, r"image 2 of 2: image not found: .*nope.png"),
        ({**good, "image": rows[0]["image"]}, "both 'image' and 'images' given"),
        ({**good, "images": "x.png"}, "'images' must be a list"),
    ]
    for bad, reason in cases:
        got = check_row(world / "mimic.jsonl", "mimic", 0, bad, None, world)
        assert isinstance(got, Rejection), bad
        assert re.search(reason, got.reason), got.reason
    # a list under `image` and no placeholders are fine too
    plain = {"id": "b", "image": [rows[0]["image"], rows[1]["image"]],
             "conversations": [{"from": "human", "value": "same?"}, {"from": "gpt", "value": "no"}]}
    assert len(check_row(world / "mimic.jsonl", "mimic", 0, plain, None, world).images) == 2


def _independent(model_dir: Path, world: Path, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    images = [Image.open(world / ref).convert("RGB") for ref in row["image"]]
    enc = processor(text=row["teacher_prompt"], images=images, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return enc["input_ids"][0], torch.log_softmax(logits.double(), dim=-1)


def _check_against_forward(model_dir: Path, world: Path, dump_dir: Path, rows: int = 2) -> None:
    single = [r for p in shard_paths(dump_dir, "mimic") for r in pq.read_table(p).to_pylist()
              if len(r["response_turn_lengths"]) == 1]
    assert single and all(len(r["image"]) == 2 and len(r["image_sha256"]) == 2 for r in single)
    for row in single[:rows]:
        ids, logp = _independent(model_dir, world, row)
        n, flat = len(row["response_ids"]), ids.tolist()
        # the single answer is the last run of its ids (a template may end with a newline after it)
        start = next(s for s in range(len(flat) - n, -1, -1) if flat[s : s + n] == row["response_ids"])
        assert len(flat) - (start + n) <= 1
        for t, p in enumerate(range(start, start + n)):
            assert abs(logp[p - 1][ids[p]].item() - row["target_logprobs"][t]) < 1e-4
            np.testing.assert_allclose(row["topk_logprobs"][t], torch.topk(logp[p - 1], 8).values.numpy(), atol=1e-4)


@pytest.mark.integration
def test_two_image_dumps_equal_an_independent_forward_and_train(world, teacher, moe_student, tmp_path):
    from tests.conftest import dump

    two = _two_image_world(world, tmp_path / "world2")
    hf, vllm = tmp_path / "hf", tmp_path / "vllm"
    dump(two, teacher, hf, "hf", shards=1, max_images=2)
    dump(two, teacher, vllm, "vllm", shards=1, max_images=2)
    _check_against_forward(teacher, two, hf)
    assert verify_dump(hf) == [] and verify_dump(vllm) == []
    read = lambda d: [r for p in shard_paths(d, "mimic") for r in pq.read_table(p).to_pylist()]  # noqa: E731
    for a, b in zip(read(hf), read(vllm)):
        assert a["response_ids"] == b["response_ids"] and a["image_sha256"] == b["image_sha256"]
        np.testing.assert_allclose(np.array(a["target_logprobs"]), np.array(b["target_logprobs"]), atol=1e-4)
    config = tmp_path / "c.yaml"
    config.write_text("steps: 2\nbatch_size: 2\nloader_workers: 0\n")
    for stage in ("mimic", "pref"):
        run = subprocess.run([sys.executable, "-m", "pipelines.cli", "train", "--stage", stage, "--shards", str(hf),
                              "--student", str(moe_student), "--out", str(tmp_path / stage), "--config", str(config),
                              "--image-root", str(two)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    # a sample with more images than --max-images is refused, naming the flag
    from teacher_dump.run import DumpConfig, InputError, dump_teacher

    with pytest.raises(InputError, match=r"holds shards of another max images \(2 != 3\)"):
        dump(two, teacher, hf, "hf", shards=1, max_images=3)  # a --skip-invalid run's shards would lack rows
    with pytest.raises(InputError, match=r"2 images > --max-images 1; raise --max-images"):
        dump_teacher(DumpConfig(model=teacher, out=tmp_path / "one", mimic_data=two / "mimic.jsonl", shards=1,
                                top_k=8, backend="hf", max_model_len=256, progress=False, max_images=1))


@pytest.mark.integration
@pytest.mark.parametrize("family", ["smolvlm", "llava_next"])
def test_two_image_family_dumps_equal_an_independent_forward(family, family_models, family_world, tmp_path):
    from teacher_dump.run import DumpConfig, dump_teacher

    two = _two_image_world(family_world, tmp_path / "world2", n=4)
    out = tmp_path / "dump"
    dump_teacher(DumpConfig(model=family_models[family], out=out, mimic_data=two / "mimic.jsonl", shards=1, top_k=8,
                            backend="hf", max_model_len=1024, progress=False, encoding="f32", max_images=2))
    _check_against_forward(family_models[family], two, out)


def test_validation_counts_image_tokens_without_making_pixels(family_models, teacher):
    """The processor's counting helper gives the length the full processor makes (checked on an
    encoder's first images before it is trusted); a helper that disagrees is not used."""
    from tests.conftest import SIZES

    sizes = SIZES + [(300, 200), (96, 40)] * 3
    for model in (family_models["smolvlm"], family_models["llava_next"], family_models["blip2"], teacher):
        enc = load_encoder(model)
        for size in sizes:
            image = Image.new("RGB", size, (10, 200, 30))
            counted = enc.counted_image(image)
            assert len(counted.ids) == len(enc.image_features(image).ids) and counted.tensors == {}, (model, size)
    enc = load_encoder(family_models["smolvlm"])
    assert enc._count_helper_ok is None
    for size in sizes:
        enc.counted_image(Image.new("RGB", size))
    assert enc._count_helper_ok is True  # trusted after its first checks
    liar = load_encoder(family_models["smolvlm"])
    real = liar.processor._get_num_multimodal_tokens
    liar.processor._get_num_multimodal_tokens = lambda **kw: type("D", (), {
        "num_image_tokens": [n + 1 for n in real(**kw).num_image_tokens]})()
    for size in sizes:
        image = Image.new("RGB", size)
        assert len(liar.counted_image(image).ids) == len(liar.image_features(image).ids)
    assert liar._count_helper_ok is False
