"""On-policy rounds: the teacher scores exactly the tokens the student sampled, and `lmod onpolicy`
runs, resumes and accounts for its rounds."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.integration


def test_a_dump_of_student_samples_holds_the_teachers_logprobs_at_exactly_the_sampled_tokens(world, teacher,
                                                                                            moe_student, tmp_path):
    """The student samples (temperature 1: token sequences a tokenizer would not produce from their
    text); the dump's response ids are those ids, and its log-probs equal a plain forward of the
    teacher on the generation prompt followed by them."""
    from shared.codec import read_table
    from shared.images import open_rgb
    from shared.mllm import batch_inputs, load_encoder
    from shared.models import load_model
    from shared.prompt import llava_messages
    from shared.shards import shard_paths
    from teacher_dump.backends import Sampling
    from teacher_dump.generate import GenerateConfig, generate
    from teacher_dump.run import DumpConfig, dump_teacher

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(line + "\n" for line in (world / "mimic.jsonl").read_text().splitlines()[:6]))
    samples = tmp_path / "samples.jsonl"
    generate(GenerateConfig(model=moe_student, data=prompts, out=samples, image_root=world, backend="hf",
                            sampling=Sampling(temperature=1.0, max_new_tokens=12), seed=3))
    records = {r["id"]: r for r in map(json.loads, samples.read_text().splitlines())}
    enc = load_encoder(teacher)
    retokenized = 0
    for r in records.values():
        own = enc.response_ids(llava_messages(r["conversations"], 1))[-1]
        retokenized += own != r["generation"]["response_ids"]
    assert retokenized, "every sample re-encodes to its own ids: the test would not tell the two apart"

    dump = tmp_path / "dump"
    dump_teacher(DumpConfig(model=teacher, out=dump, mimic_data=samples, image_root=world, shards=1, top_k=8,
                            backend="hf", encoding="f32", max_model_len=256, progress=False))
    model = load_model(teacher).eval()
    rows = [row for p in shard_paths(dump, "mimic") for row in read_table(p).to_pylist()]
    assert len(rows) == len(records)
    for row in rows:
        rec = records[row["sample_id"]]
        sampled = rec["generation"]["response_ids"]
        n = len(sampled)  # the last answer is the sampled one (earlier turns are the template's)
        assert row["response_ids"][-n:] == sampled
        image = open_rgb(world / rec["image"])
        features = [enc.image_features(image)]
        prompt = enc.encode_prompt(llava_messages(rec["conversations"][:-1], 1), features)
        inputs = batch_inputs(enc, [prompt.ids + sampled], [features])
        with torch.no_grad():
            logp = torch.log_softmax(model(**inputs).logits[0].float(), -1)
        start = len(prompt.ids)
        expected = [float(logp[start - 1 + j, t]) for j, t in enumerate(sampled)]
        assert row["target_logprobs"][-n:] == pytest.approx(expected, abs=1e-4)
        top = torch.topk(logp[start - 1 : start - 1 + n], 8, -1)
        assert [list(ids) for ids in row["topk_ids"][-n:]] == top.indices.tolist()
