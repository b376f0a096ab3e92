"""Teacher fingerprints: a retrained teacher of the same shape is another teacher, also above the
size where weights are no longer hashed in full."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import shared.fingerprint as fingerprint


def _teacher(path, seed: int):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    g = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(1024, 512, generator=g), "b": torch.randn(512, 512, generator=g)},
              str(path / "model.safetensors"))
    return path


def test_a_retrained_teacher_of_the_same_shape_gets_another_fingerprint_above_the_full_hash_limit(tmp_path,
                                                                                                  monkeypatch):
    one, two = _teacher(tmp_path / "one", 0), _teacher(tmp_path / "two", 1)
    monkeypatch.setattr(fingerprint, "FULL_HASH_LIMIT_BYTES", 1 << 20)  # these files are 3 MB: sampled mode
    a, b = fingerprint.teacher_fingerprint(one), fingerprint.teacher_fingerprint(two)
    assert a["weights_hash_mode"] == b["weights_hash_mode"] == "headers+samples"
    assert a["config_sha256"] == b["config_sha256"] and a["weights_sha256"] != b["weights_sha256"]
    assert fingerprint.teacher_fingerprint(one) == a  # and stable
