"""Sparse upcycling: a standard transformers model that equals the dense student at init."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from shared.mllm import batch_inputs, load_encoder, load_processor
from shared.prompt import llava_messages
from student_train.moe import active_parameters, make_dense_student, upcycle


@pytest.fixture(scope="module")
def dense(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("dense")
    make_dense_student(teacher, out)
    return out


def _batch(model_dir, world):
    import json

    enc = load_encoder(model_dir)
    recs = [json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()[:4]]
    encoded = [enc.encode(llava_messages(r["conversations"], True),
                          enc.image_features(Image.open(world / r["image"]).convert("RGB"))) for r in recs]
    return batch_inputs(enc, [e.ids for e in encoded], [e.images for e in encoded])


def test_upcycled_equals_dense_at_init_and_reloads(dense, world, tmp_path):
    from transformers import AutoModelForImageTextToText

    moe_dir = tmp_path / "moe"
    layers = upcycle(dense, moe_dir, num_experts=4, top_k=2)
    assert layers == [1]
    d = AutoModelForImageTextToText.from_pretrained(str(dense)).eval()
    m = AutoModelForImageTextToText.from_pretrained(str(moe_dir)).eval()
    assert m.config.text_config.model_type == "qwen3_moe" and m.config.text_config.mlp_only_layers == [0]
    batch = _batch(moe_dir, world)
    with torch.no_grad():
        torch.testing.assert_close(m(**batch).logits, d(**batch).logits, atol=2e-5, rtol=1e-4)
    assert active_parameters(m) < sum(p.numel() for p in m.parameters())
    assert load_processor(moe_dir).tokenizer.get_vocab() == load_processor(dense).tokenizer.get_vocab()


def test_noise_breaks_symmetry_and_bad_layers_are_refused(dense, tmp_path):
    from transformers import AutoModelForImageTextToText

    upcycle(dense, tmp_path / "noisy", noise=0.01, moe_layers=[0, 1])
    m = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "noisy"))
    experts = dict(m.named_parameters())
    w = next(v for k, v in experts.items() if k.endswith("layers.0.mlp.experts.down_proj"))
    assert not torch.equal(w[0], w[1])
    with pytest.raises(ValueError, match="moe layers"):
        upcycle(dense, tmp_path / "bad", moe_layers=[5])


def test_the_dense_student_takes_the_teachers_image_size(teacher, tmp_path):
    """The student reuses the teacher's processor, so its vision tower must take the images that
    processor makes (not the tiny world's size)."""
    import json
    import shutil

    from transformers import AutoConfig

    other = tmp_path / "teacher"
    shutil.copytree(teacher, other)
    config = json.loads((other / "config.json").read_text())
    config["vision_config"]["image_size"] *= 2
    (other / "config.json").write_text(json.dumps(config))
    make_dense_student(other, tmp_path / "student", vision="fresh")
    got = AutoConfig.from_pretrained(str(tmp_path / "student")).vision_config.image_size
    assert got == config["vision_config"]["image_size"]
    # The teacher's own tower no longer fits its (edited) config: refused in one line, not half-copied.
    with pytest.raises(ValueError, match="does not match its config.*--fresh-vision"):
        make_dense_student(other, tmp_path / "student-shared")
    # Damaged or missing teacher weights: one line naming them, and nothing written.
    weights = other / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors: unreadable"):
        make_dense_student(other, tmp_path / "student-damaged")
    weights.unlink()
    with pytest.raises(ValueError, match="no vision tower weights"):
        make_dense_student(other, tmp_path / "student-damaged")
    assert not (tmp_path / "student-damaged").exists()


def test_the_dense_student_starts_from_the_teachers_vision_tower(teacher, dense, tmp_path):
    """LLaVA-MoD's student shares the teacher's vision encoder: same weights; the projector is the
    teacher's only where the text widths match (here they do not: it is fresh)."""
    from safetensors.torch import load_file

    t = load_file(str(teacher / "model.safetensors"))
    s = load_file(str(dense / "model.safetensors"))
    vision = [k for k in t if k.startswith("model.vision_model.")]
    assert vision and all(torch.equal(t[k], s[k]) for k in vision)
    assert t["model.connector.modality_projection.proj.weight"].shape != \
        s["model.connector.modality_projection.proj.weight"].shape
    make_dense_student(teacher, tmp_path / "fresh", vision="fresh")
    f = load_file(str(tmp_path / "fresh" / "model.safetensors"))
    assert f["model.vision_model.embeddings.patch_embedding.weight"].shape[0] == 64  # StudentConfig's width
