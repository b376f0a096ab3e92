"""On-policy rounds: the teacher scores exactly the tokens the student sampled, and `lmod onpolicy`
runs, resumes and accounts for its rounds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _onpolicy_args(teacher: Path, student: Path, data: Path, out: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "onpolicy", "--teacher", str(teacher), "--student", str(student),
            "--data", str(data), "--rounds", "2", "--out", str(out), "--config", str(config), "--backend", "hf",
            "--max-new-tokens", "8", "--top-k", "4", "--image-root", str(data.parent.parent / "world")]


@pytest.mark.slow
def test_onpolicy_killed_mid_round_continues_that_round_keeps_the_finished_one_and_refuses_another_teacher(
        world, teacher, moe_student, tmp_path):
    """Two rounds straight vs. killed (SIGKILL) during round 2 and rerun: round 1 is not redone (its
    files untouched), round 2 finishes, and both runs end with the same bytes (samples, shards,
    weights). Another teacher for the same OUT is one line. (The second run starts from a copy of the
    first's finished round 1: the same state a run killed in round 2 has, at half the cost.)"""
    import shutil

    from typer.testing import CliRunner

    from pipelines.cli import app

    root = Path(__file__).parents[1]
    data = tmp_path / "in" / "prompts.jsonl"
    data.parent.mkdir()
    (tmp_path / "world").symlink_to(world)  # the prompts' images
    data.write_text("".join(line + "\n" for line in (world / "mimic.jsonl").read_text().splitlines()[:8]))
    (tmp_path / "c.yaml").write_text("steps: 3\nbatch_size: 4\nwarmup: 1\nloader_workers: 0\nsave_every: 1\n")
    straight = subprocess.run(_onpolicy_args(teacher, moe_student, data, tmp_path / "a", tmp_path / "c.yaml"),
                              cwd=root, capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]
    rounds = json.loads(straight.stdout.strip().splitlines()[-1])
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["student_in"].endswith("round-1/student")
    assert all(r["generated_tokens"] > 0 and r["teacher_scored_tokens"] >= r["generated_tokens"] for r in rounds)

    out = tmp_path / "b"
    out.mkdir()
    shutil.copytree(tmp_path / "a" / "round-1", out / "round-1", symlinks=True)
    shutil.copy2(tmp_path / "a" / "onpolicy.json", out / "onpolicy.json")
    proc = subprocess.Popen(_onpolicy_args(teacher, moe_student, data, out, tmp_path / "c.yaml"), cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 400
    while not (out / "round-2" / "samples.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "round-2" / "round.json").exists()
    first = {p: p.stat().st_mtime_ns for p in (out / "round-1").rglob("*") if p.is_file()}
    rerun = subprocess.run(_onpolicy_args(teacher, moe_student, data, out, tmp_path / "c.yaml"), cwd=root,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "round 1 (finished earlier)" in rerun.stderr and "round 1: the student" not in rerun.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())
    for rel in ("round-2/samples.jsonl", "round-2/dump/mimic/shard-00000-of-00001.parquet",
                "round-2/student/model.safetensors"):
        assert (out / rel).read_bytes() == (tmp_path / "a" / rel).read_bytes(), rel

    other = CliRunner().invoke(app, ["onpolicy", "--teacher", str(moe_student), "--student", str(moe_student),
                                     "--data", str(data), "--rounds", "3", "--out", str(out), "--config",
                                     str(tmp_path / "c.yaml"), "--backend", "hf", "--image-root",
                                     str(tmp_path / "world")])
    assert other.exit_code == 2 and "not the teacher of the rounds" in other.output, other.output
    assert not (out / "round-3").exists()
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "question": "q"}\n{broken\n')
    bad = CliRunner().invoke(app, ["onpolicy", "--teacher", str(teacher), "--student", str(moe_student), "--data",
                                   str(tmp_path / "bad.jsonl"), "--rounds", "1", "--out", str(tmp_path / "c")])
    assert bad.exit_code == 2 and "bad.jsonl:2: malformed JSON" in bad.output and not (tmp_path / "c").exists()
    (out / "onpolicy.json").write_text("{cut")
    damaged = CliRunner().invoke(app, ["onpolicy", "--teacher", str(teacher), "--student", str(moe_student), "--data",
                                       str(data), "--rounds", "3", "--out", str(out), "--image-root",
                                       str(tmp_path / "world")])
    assert damaged.exit_code == 2 and "onpolicy.json: damaged" in damaged.output


def test_prompts_per_round_walk_through_the_data_and_wrap_around(tmp_path):
    from pipelines.onpolicy import OnPolicyConfig, OnPolicyError, _round_prompts, check
    from student_train.config import TrainConfig

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"id": i, "question": f"q{i}"}) + "\n" for i in range(5)))
    cfg = OnPolicyConfig(teacher=tmp_path, student=tmp_path, data=data, out=tmp_path / "out", rounds=3,
                         train=TrainConfig(), prompts_per_round=2)
    ids = []
    for n in (1, 2, 3):
        (tmp_path / f"r{n}").mkdir()
        ids.append([json.loads(line)["id"] for line in _round_prompts(cfg, n, tmp_path / f"r{n}").read_text()
                    .splitlines()])
    assert ids == [[0, 1], [2, 3], [4, 0]]
    cfg.data = tmp_path / "missing.jsonl"
    with pytest.raises(OnPolicyError, match="missing.jsonl: no such file"):
        check(cfg)
    cfg.data = tmp_path / "p.parquet"
    cfg.data.write_bytes(b"")
    with pytest.raises(OnPolicyError, match="takes a JSONL --data"):
        check(cfg)
    cfg.data = data
    for fraction, offpolicy, said in [(0.5, [], "pass --offpolicy-dump DIR"), (1.0, [tmp_path], "between 0 and 1"),
                                      (0.99, [tmp_path], "less than one row of batch_size 8")]:
        cfg.onpolicy_fraction, cfg.offpolicy = fraction, offpolicy
        cfg.train = TrainConfig(batch_size=8)
        with pytest.raises(OnPolicyError, match=said):
            check(cfg)
