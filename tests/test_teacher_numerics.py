"""What the teacher stores, numerically: the head in float32 under bf16 weights, the family's logit
transform (Gemma 2 soft-capping, Cohere's scale, Granite's divisor) applied as transformers applies
it, and no KV cache built for a scoring forward."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from shared.shards import shard_paths

pytestmark = pytest.mark.integration

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "chat_template.json")


def _text_model(kind: str, teacher: Path, out: Path, **extra) -> Path:
    """A random-init 1-layer text-only model of `kind` with the tiny teacher's tokenizer and template."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    config = AutoConfig.for_model(kind, vocab_size=len(tok), hidden_size=128, intermediate_size=256,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                                  eos_token_id=tok.eos_token_id, bos_token_id=None, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits big enough for the transform to matter
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(str(out))
    for name in _TOKENIZER_FILES:
        if (teacher / name).is_file():
            shutil.copy2(teacher / name, out / name)
    return out


def _text_world(world: Path, out: Path) -> Path:
    rows = [json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()[:6]]
    out.mkdir(parents=True, exist_ok=True)
    text = [{"id": r["id"], "conversations": [{**t, "value": t["value"].replace("<image>", "").strip()}
                                              for t in r["conversations"]]} for r in rows]
    (out / "mimic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text))
    return out / "mimic.jsonl"


@pytest.mark.parametrize("kind,extra,key", [("gemma2", {"final_logit_softcapping": 5.0}, "final_logit_softcapping"),
                                            ("cohere", {"logit_scale": 0.25}, "logit_scale"),
                                            ("granite", {"logits_scaling": 4.0}, "logits_scaling")])
def test_the_teacher_applies_its_familys_logit_transform(kind, extra, key, teacher, world, tmp_path):
    from transformers import AutoModelForCausalLM

    from shared.mllm import load_encoder
    from shared.models import logit_transform
    from teacher_dump.run import DumpConfig, dump_teacher

    model_dir = _text_model(kind, teacher, tmp_path / kind, **extra)
    assert logit_transform(AutoModelForCausalLM.from_pretrained(str(model_dir)).config) is not None
    data = _text_world(world, tmp_path / "data")
    dump_teacher(DumpConfig(model=model_dir, out=tmp_path / "dump", mimic_data=data, shards=1, top_k=8,
                            backend="hf", progress=False, encoding="f32"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    encoder = load_encoder(model_dir)
    rows = [r for p in shard_paths(tmp_path / "dump", "mimic") for r in pq.read_table(p).to_pylist()]
    raw_gap = 0.0
    for row in rows:
        ids = encoder.tokenizer(row["teacher_prompt"], add_special_tokens=False)["input_ids"]
        at, start = [], 0  # each turn's response ids, in order, in the full tokenisation
        for n in row["response_turn_lengths"]:
            turn = row["response_ids"][len(at) : len(at) + n]
            start = next(p for p in range(start, len(ids) - n + 1) if ids[p : p + n] == turn)
            at += range(start, start + n)
            start += n
        n, pos = len(at), torch.tensor(at)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        # transformers' own logits carry the transform; the stored values must equal them
        logp = torch.log_softmax(out.logits[0].double(), -1)[pos - 1]
        np.testing.assert_allclose(row["target_logprobs"], logp[torch.arange(n), torch.tensor(row["response_ids"])],
                                   atol=1e-4)
        np.testing.assert_allclose(np.asarray(row["topk_logprobs"]), logp.topk(8, -1).values.numpy(), atol=1e-4)
        raw = torch.log_softmax(model.get_output_embeddings()(out.hidden_states[-1][0]).double(), -1)
        raw_gap = max(raw_gap, float((raw[pos - 1].topk(8, -1).values - logp.topk(8, -1).values).abs().max()))
    assert raw_gap > 0.1, f"{key}: the transform made no difference on this stand-in; the test shows nothing"


def test_a_bf16_teachers_head_runs_in_float32_without_a_kv_cache(teacher, world):
    from shared.mllm import batch_inputs, load_encoder
    from teacher_dump.backends import HFBackend
    from teacher_dump.inputs import read_records
    from teacher_dump.worker import prepare, score_request

    backend = HFBackend(teacher, dtype="bfloat16")
    assert backend.model.dtype == torch.bfloat16 and backend.head.weight.dtype == torch.float32
    caches = []
    backend.model.register_forward_hook(lambda m, i, o: caches.append(getattr(o, "past_key_values", None)))
    records, _ = read_records(world / "mimic.jsonl", "mimic", None)
    encoder = load_encoder(teacher)
    items = [prepare(encoder, r) for r in records[:4]]
    requests = [score_request(item.sequences[0], item.images, 8) for item in items]
    results = backend.score(requests)
    assert caches and all(c is None for c in caches)
    # The float32 reference from the same bf16 hidden states; the bf16-rounded logits are worse.
    inputs = batch_inputs(encoder, [requests[0].ids], [requests[0].features], "cpu", torch.bfloat16)
    hidden = backend.body(backend.model, inputs)
    h = hidden[0, torch.tensor(requests[0].positions) - 1]
    exact = torch.log_softmax(h.double() @ backend.body.head.weight.double().T, -1).topk(8, -1).values
    rounded = torch.log_softmax(backend.body.head(h).float().double(), -1).topk(8, -1).values
    stored = torch.from_numpy(results[0].topk_logprobs).double()
    assert (stored - exact).abs().max() < 1e-4
    assert (rounded - exact).abs().max() > 10 * (stored - exact).abs().max()
