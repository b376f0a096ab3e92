"""Real model families through the whole pipeline, on tiny random-init stand-ins (same classes,
processors and chat templates as the real checkpoints): SmolVLM/Idefics3 with image splitting
(vLLM + hf), LLaVA-NeXT anyres (hf: vLLM's LLaVA imports torchvision here), BLIP-2 with an OPT
text model (vLLM + hf). One vLLM engine per family per session."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from shared.mllm import load_encoder
from shared.prompt import TemplateError, llava_messages
from shared.shards import shard_paths
from tests.conftest import SIZES, free_port


def _rows(dump: Path, kind: str) -> list[dict]:
    return [r for p in shard_paths(dump, kind) for r in pq.read_table(p).to_pylist()]


def _ask(encoder, size, question="hi", answer="red"):
    image = encoder.image_features(Image.new("RGB", size, (200, 30, 30)))
    return encoder.encode(llava_messages([{"from": "human", "value": f"<image>\n{question}"},
                                          {"from": "gpt", "value": answer}], True), image)


def test_image_tokens_are_expanded_per_image(family_models):
    smol = load_encoder(family_models["smolvlm"])
    counts = {size: len(_ask(smol, size).images[0].ids) for size in SIZES}
    assert counts[(64, 64)] != counts[(128, 64)], counts  # image splitting: the count follows the image
    llava = load_encoder(family_models["llava_next"])
    # anyres: `<image>hi` is 38, 54, 90 tokens for 56x56, 112x56, 112x112 (2 text tokens + CLIP's CLS).
    prompt = [len(llava.encode_prompt([{"role": "user", "content": [{"type": "image"}]}],
                                      llava.image_features(Image.new("RGB", s))).images[0].ids) + 2
              for s in ((56, 56), (112, 56), (112, 112))]
    assert prompt == [38, 54, 90]


@pytest.mark.parametrize("family", ["smolvlm", "llava_next", "blip2"])
def test_templates_give_responses_ending_in_end_of_turn(family, family_models):
    enc = load_encoder(family_models[family])
    sample = _ask(enc, (64, 64))
    response = [t for t, m in zip(sample.ids, sample.response_mask) if m]
    assert response[-1] in enc.eos_ids and enc.tokenizer.decode(response[:-1]).strip() == "red"
    assert sample.turn_lengths == [len(response)]


@pytest.mark.parametrize("family", ["smolvlm", "llava_next", "blip2"])
def test_hf_dump_scores_what_the_processor_builds(family, family_models, family_world, family_dumps):
    """Independent check: the model's processor on the stored prompt text + image, a full forward
    pass, log_softmax. Equal ids and log-probs mean our per-sample expansion is the processor's."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model_dir = family_models[family]
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir)).eval()
    rows = [r for r in _rows(family_dumps[family, "hf"], "mimic") if len(r["response_turn_lengths"]) == 1][:4]
    assert len({Image.open(family_world / r["image"][0]).size for r in rows}) > 1
    for row in rows:
        enc = processor(text=row["teacher_prompt"], images=[Image.open(family_world / row["image"][0]).convert("RGB")],
                        add_special_tokens=False, return_tensors="pt")
        ids = enc["input_ids"][0]
        n = len(row["response_ids"])
        starts = [p for p in range(len(ids) - n + 1) if ids[p : p + n].tolist() == row["response_ids"]]
        assert starts, "the stored response ids are not in the processor's tokenisation of the prompt"
        tail = starts[-1]
        with torch.no_grad():
            logp = torch.log_softmax(model(**enc).logits[0].double(), -1)
        expected = logp[torch.arange(tail - 1, tail - 1 + n), ids[tail : tail + n]]
        np.testing.assert_allclose(row["target_logprobs"], expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("family", ["smolvlm", "blip2"])
def test_vllm_and_hf_agree_on_every_stored_logprob(family, family_dumps):
    for kind in ("mimic", "pref"):
        v_rows, h_rows = _rows(family_dumps[family, "vllm"], kind), _rows(family_dumps[family, "hf"], kind)
        assert [r["sample_id"] for r in v_rows] == [r["sample_id"] for r in h_rows] and v_rows
        for v, h in zip(v_rows, h_rows):
            keys = ("chosen_logprobs", "rejected_logprobs") if kind == "pref" else ("target_logprobs",
                                                                                  "topk_logprobs")
            for key in keys:
                np.testing.assert_allclose(v[key], h[key], atol=1e-3)
            if kind == "mimic":
                assert v["response_ids"] == h["response_ids"] and v["teacher_prompt"] == h["teacher_prompt"]


@pytest.mark.parametrize("family,teacher_family", [("smolvlm", "smolvlm"), ("llava_next", "llava_next"),
                                                   ("smolvlm", "blip2")])
def test_family_shards_train_an_upcycled_student(family, teacher_family, family_models, family_dumps, family_world,
                                                 tmp_path):
    """Upcycle the family's dense model and distil from the shards; the BLIP-2 teacher (OPT has no
    MoE counterpart) teaches a SmolVLM student: teacher and student differ in template and towers."""
    from student_train.evaluate import kl_to_teacher
    from student_train.moe import upcycle
    from student_train.train import TrainConfig, train

    student = tmp_path / "student"
    upcycle(family_models[f"{family}-base"], student, num_experts=4, top_k=2)
    dump = family_dumps[teacher_family, "hf"]
    before = kl_to_teacher(student, [dump], family_world)
    cfg = TrainConfig(stage="mimic", steps=12, batch_size=4, lr=3e-3, warmup=2)
    train([dump], student, tmp_path / "trained", cfg, image_root=family_world, progress=False)
    after = kl_to_teacher(tmp_path / "trained", [dump], family_world)
    assert after < 0.8 * before, (before, after)


def test_a_template_that_rewrites_earlier_turns_is_refused(family_models):
    enc = load_encoder(family_models["smolvlm"])
    # Renders only the last assistant turn, as some reasoning templates do with earlier thoughts.
    enc.template = ("{% for m in messages %}{% if m['role'] == 'user' or loop.last %}{{ m['role'] }}: "
                    "{{ m['content'][-1]['text'] }}<end_of_utterance>{% endif %}{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
    turns = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
             {"from": "gpt", "value": "d"}]
    with pytest.raises(TemplateError, match=f"{family_models['smolvlm']}.*incrementally"):
        enc.encode(llava_messages(turns, False))
    enc.template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'][-1]['text'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(TemplateError, match="end-of-turn"):
        enc.encode(llava_messages(turns[:2], False))


@pytest.mark.parametrize("family,text_model,layers,moe_type", [
    ("smolvlm", "llama", "every-other", "qwen2_moe"),  # dense layers between MoE ones
    ("smolvlm", "llama", "all", "mixtral"),
    ("smolvlm", "qwen3", "every-other", "qwen3_moe"),
    ("llava_next", "qwen2", "1", "qwen2_moe"),
])
def test_upcycled_student_equals_the_dense_model_on_images_of_several_sizes(family, text_model, layers, moe_type,
                                                                             family_tok, tmp_path):
    from transformers import AutoModelForImageTextToText

    from pipelines.toy.tiny_families import build_tiny_family
    from shared.mllm import batch_inputs
    from student_train.moe import upcycle

    dense_dir = build_tiny_family(family, tmp_path / "dense", family_tok, text_model=text_model, layers=3, seed=2)
    got = upcycle(dense_dir, tmp_path / "moe", num_experts=4, top_k=2, moe_layers=layers)
    assert got == {"every-other": [1], "all": [0, 1, 2], "1": [1]}[layers]
    moe = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "moe")).eval()
    dense = AutoModelForImageTextToText.from_pretrained(str(dense_dir)).eval()
    assert moe.config.get_text_config().model_type == moe_type
    enc = load_encoder(tmp_path / "moe")
    assert enc.template == load_encoder(dense_dir).template
    samples = [_ask(enc, size, answer="a red circle") for size in SIZES]
    batch = batch_inputs(enc, [s.ids for s in samples], [s.images for s in samples])
    with torch.no_grad():
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=2e-5, rtol=1e-4)


def test_upcycling_refuses_a_text_model_without_moe_counterpart(family_models, tmp_path):
    from student_train.moe import upcycle

    with pytest.raises(ValueError, match=r"'opt' has no MoE counterpart.*supported: llama, mistral, qwen2, qwen3"):
        upcycle(family_models["blip2"], tmp_path / "x")
    with pytest.raises(ValueError, match="moe layers"):
        upcycle(family_models["smolvlm"], tmp_path / "y", moe_layers="7")


def test_qwen3_vl_upcycles_into_qwen3_vl_moe(tmp_path):
    """Qwen3-VL's processor needs torchvision here, so the model is built from its config alone and
    fed a hand-made image (a 4x4 patch grid, M-RoPE token types)."""
    from transformers import AutoModelForImageTextToText, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from student_train.moe import upcycle

    torch.manual_seed(0)
    config = Qwen3VLConfig(
        text_config={"vocab_size": 300, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 64,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}},
        vision_config={"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 1, "out_hidden_size": 128,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "deepstack_visual_indexes": [0]},
        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    Qwen3VLForConditionalGeneration(config).save_pretrained(str(tmp_path / "dense"))
    assert upcycle(tmp_path / "dense", tmp_path / "moe") == [1]
    dense = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "dense")).eval()
    moe = AutoModelForImageTextToText.from_pretrained(str(tmp_path / "moe")).eval()
    assert type(moe).__name__ == "Qwen3VLMoeForConditionalGeneration"
    ids = torch.tensor([[5, 6, 292] + [290] * 4 + [293, 7, 8, 9]])
    batch = {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 14 * 14),
             "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == 290).long()}
    with torch.no_grad():
        torch.testing.assert_close(moe(**batch).logits, dense(**batch).logits, atol=2e-5, rtol=1e-4)



@pytest.mark.distributed
def test_ddp_trains_a_llava_next_student_on_rows_with_and_without_images(family_models, family_world, tmp_path):
    """2 gloo ranks vs one process, everything trainable, on a LLaVA-NeXT student whose CLIP tower's
    last layer and post-layernorm are never read, over rows with and without images (a rank's
    micro-batch may hold none): DDP needs the same gradient set on every rank."""
    import json
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from student_train.moe import upcycle
    from student_train.train import TrainConfig, train
    from tests.conftest import _dump

    world = tmp_path / "world"
    world.mkdir()
    rows = [json.loads(line) for line in (family_world / "mimic.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 3 == 0:  # a third of the rows are text only
            row.pop("image")
            for turn in row["conversations"]:
                turn["value"] = turn["value"].replace("<image>\n", "").replace("<image>", "")
    (world / "mimic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (world / "pref.jsonl").write_text((family_world / "pref.jsonl").read_text())
    os.symlink(family_world / "images", world / "images")
    dump = tmp_path / "dump"
    _dump(family_models["llava_next"], world, dump, "hf")
    student = tmp_path / "student"
    upcycle(family_models["llava_next-base"], student, num_experts=4, top_k=2)
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text("stage: mimic\nsteps: 3\nbatch_size: 4\nlr: 0.002\nwarmup: 1\naux_loss_coef: 0.0\n"
                        "loader_workers: 0\ntrain: [all]\n")
    train([dump], student, tmp_path / "one", TrainConfig.from_yaml(cfg_file), image_root=world, progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "pipelines.cli", "train", "--stage", "mimic", "--shards", str(dump), "--student", str(student),
           "--out", str(tmp_path / "two"), "--config", str(cfg_file), "--image-root", str(world)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    start = load_file(student / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a if "vision_tower" in k), "the vision tower did not train"
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_a_token_across_the_prompt_response_boundary_belongs_to_the_response(family_models):
    """A generation prompt ending in a space ("Assistant: ") before a byte-level BPE answer: " red"
    is one token. It is the response's first token (was: refused), the prompt ends before it, and
    a student with another template takes the stored response ids as they are."""
    enc = load_encoder(family_models["smolvlm"])
    enc.template = ("{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'][-1]['text'] }}"
                    "<end_of_utterance>\n{% else %}Assistant: {{ m['content'][-1]['text'] }}<end_of_utterance>\n"
                    "{% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")
    turns = [{"from": "human", "value": "what colour?"}, {"from": "gpt", "value": "red circle"}]
    got = enc.encode(llava_messages(turns, False))
    response = [t for t, m in zip(got.ids, got.response_mask) if m]
    assert enc.tokenizer.decode(response) == " red circle<end_of_utterance>"
    prompt = enc.tokenizer.decode(got.ids[: got.response_mask.index(True)])
    assert prompt.endswith("Assistant:") and enc.tokenizer.decode(got.ids) == got.text
    other = load_encoder(family_models["smolvlm"])  # the shipped template: no space after "Assistant:"
    student = other.encode(llava_messages(turns, False), responses=[response])
    assert "Assistant: red circle<end_of_utterance>" in other.tokenizer.decode(student.ids)


@pytest.mark.parametrize("family", ["smolvlm", "llava_next", "blip2"])
def test_special_token_text_in_the_data_is_refused_naming_the_token(family, family_models):
    """Every special token of each family's tokenizer, as literal text in an answer or a question, is
    refused (it was read as the token: an answer cut at its end-of-turn, a turn forged in a question)."""
    enc = load_encoder(family_models[family])
    assert enc.special_texts
    for tok in enc.special_texts:
        for turns, part in [([{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": f"a {tok} b"}],
                             "answer of turn 1"),
                            ([{"from": "human", "value": f"<image>\nwhat {tok}?"}, {"from": "gpt", "value": "b"}],
                             "question of turn 0")]:
            if tok == "<image>" and part.startswith("question"):
                continue  # LLaVA data's own image placeholder: an image there, not text
            with pytest.raises(ValueError, match=f"{part} contains {re.escape(repr(tok))}"):
                enc.encode(llava_messages(turns, True), _ask(enc, (64, 64)).images)
