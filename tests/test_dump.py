"""The teacher stage against real components: vLLM in a Ray actor, transformers, Parquet readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from shared.manifest import Manifest
from shared.schema import MIMIC_SCHEMA, PREF_SCHEMA
from shared.shards import dump_info, shard_paths, verify_dump
from tests.conftest import TOP_K

pytestmark = pytest.mark.integration


def read_kind(dump_dir: Path, kind: str) -> list[dict]:
    rows = []
    for p in shard_paths(dump_dir, kind):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


def test_layout_and_manifest(vllm_dump: Path, world: Path, teacher: Path):
    m = Manifest.load(vllm_dump)
    assert m.run["backend"] == "vllm" and m.run["top_k"] == TOP_K and m.run["dtype"] == "float32"
    assert m.run["teacher"]["weights_hash_mode"] == "full"
    assert len(m.run["tokenizer_sha256"]) == 64
    assert sorted(m.shards) == [f"{k}/shard-0000{i}-of-00003.parquet" for k in ("mimic", "pref") for i in range(3)]
    assert sum(e.rows for e in m.shards.values() if e.kind == "mimic") == 48
    assert sum(e.rows for e in m.shards.values() if e.kind == "pref") == 24
    ranges = sorted(e.input_range for e in m.shards.values() if e.kind == "mimic")
    assert ranges[0][0] == 0 and ranges[-1][1] == 48
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no gaps or overlaps
    assert pq.read_schema(shard_paths(vllm_dump, "mimic")[0]).remove_metadata().equals(MIMIC_SCHEMA.remove_metadata())
    assert pq.ParquetFile(shard_paths(vllm_dump, "pref")[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert verify_dump(vllm_dump) == []


def _independent_logprobs(teacher: Path, world: Path, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocab log_softmax of the teacher's logits, computed here from the stored token ids."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(str(teacher))
    model = AutoModelForImageTextToText.from_pretrained(str(teacher), dtype=torch.float32).eval()
    enc = processor(text=row["teacher_prompt"], images=[Image.open(world / row["image"][0]).convert("RGB")],
                    return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    return enc["input_ids"][0], torch.log_softmax(logits.double(), dim=-1)


def test_topk_equals_full_vocab_log_softmax(vllm_dump: Path, teacher: Path, world: Path):
    single_turn = [r for r in read_kind(vllm_dump, "mimic") if len(r["response_turn_lengths"]) == 1]
    assert len(single_turn) >= 3
    for row in single_turn[:3]:
        ids, logp = _independent_logprobs(teacher, world, row)
        n = len(row["response_ids"])
        assert ids[-n:].tolist() == row["response_ids"]  # a single answer ends the sequence
        for t, p in enumerate(range(len(ids) - n, len(ids))):
            full = logp[p - 1]  # logits at p-1 predict token p
            assert abs(full[ids[p]].item() - row["target_logprobs"][t]) < 1e-4
            top = torch.topk(full, TOP_K)
            np.testing.assert_allclose(row["topk_logprobs"][t], top.values.numpy(), atol=1e-4)
            assert np.all(np.diff(row["topk_logprobs"][t]) <= 0), "top-k must be sorted descending"
            assert set(row["topk_ids"][t]) == set(top.indices.tolist())
            expected_rest = 1.0 - np.exp(np.array(row["topk_logprobs"][t], dtype=np.float64)).sum()
            assert abs(row["rest_mass"][t] - expected_rest) < 1e-6
            assert abs(row["rest_mass"][t] - (1 - torch.exp(top.values).sum().item())) < 1e-4


def test_response_token_layout(vllm_dump: Path, teacher: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    for row in read_kind(vllm_dump, "mimic")[:10]:
        turns = json.loads(row["conversations_json"])
        answers = [t["value"] for t in turns if t["from"] == "gpt"]
        assert sum(row["response_turn_lengths"]) == len(row["response_ids"]) == len(row["target_logprobs"])
        start = 0
        for answer, n in zip(answers, row["response_turn_lengths"]):
            text = tok.decode(row["response_ids"][start : start + n])
            assert text == f" {answer}<end_of_utterance>"
            start += n
        assert all(len(r) == TOP_K for r in row["topk_ids"])


def test_pref_rows(vllm_dump: Path):
    rows = read_kind(vllm_dump, "pref")
    assert len(rows) == 24
    for row in rows:
        assert len(row["chosen_ids"]) == len(row["chosen_logprobs"]) > 0
        assert len(row["rejected_ids"]) == len(row["rejected_logprobs"]) > 0
        assert row["chosen_logprob_sum"] == pytest.approx(sum(row["chosen_logprobs"]), abs=1e-5)
        assert row["rejected_logprob_sum"] == pytest.approx(sum(row["rejected_logprobs"]), abs=1e-5)
        assert all(lp <= 0 for lp in row["chosen_logprobs"] + row["rejected_logprobs"])
        assert row["teacher_prompt"].startswith("User:<image>") and row["teacher_prompt"].endswith("Assistant:")


def test_vllm_and_hf_backends_agree(vllm_dump: Path, hf_dump: Path):
    assert Manifest.load(hf_dump).run["backend"] == "hf"
    for kind in ("mimic", "pref"):
        v_rows, h_rows = read_kind(vllm_dump, kind), read_kind(hf_dump, kind)
        assert [r["sample_id"] for r in v_rows] == [r["sample_id"] for r in h_rows]
        for v, h in zip(v_rows, h_rows):
            if kind == "pref":
                for key in ("chosen_logprobs", "rejected_logprobs"):
                    np.testing.assert_allclose(v[key], h[key], atol=1e-3)
                continue
            assert v["response_ids"] == h["response_ids"]
            np.testing.assert_allclose(v["target_logprobs"], h["target_logprobs"], atol=1e-3)
            np.testing.assert_allclose(v["topk_logprobs"], h["topk_logprobs"], atol=1e-3)
            for t, (vi, hi) in enumerate(zip(v["topk_ids"], h["topk_ids"])):
                lp = h["topk_logprobs"][t]
                # Compare sets only where the k-th value is clear of ties with its neighbour.
                if abs(lp[-1] - lp[-2]) > 1e-3:
                    assert set(vi) == set(hi)


def test_readers_pyarrow_datasets_duckdb(vllm_dump: Path):
    import datasets
    import duckdb

    files = [str(p) for p in shard_paths(vllm_dump, "mimic")]
    table = pq.read_table(files[0])
    assert table.num_rows > 0
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == 48 and len(ds[0]["topk_ids"][0]) == TOP_K
    n, tokens = duckdb.sql(
        f"SELECT count(*), sum(len(response_ids)) FROM read_parquet({files!r})"
    ).fetchall()[0]
    assert n == 48
    assert tokens == sum(e.tokens for e in Manifest.load(vllm_dump).shards.values() if e.kind == "mimic")
    pref_files = [str(p) for p in shard_paths(vllm_dump, "pref")]
    (rows,) = duckdb.sql(f"SELECT count(*) FROM read_parquet({pref_files!r}) WHERE chosen_logprob_sum < 0").fetchall()
    assert rows[0] == 24


def test_info(vllm_dump: Path):
    info = dump_info(vllm_dump)
    assert info["top_k"] == TOP_K and info["backend"] == "vllm"
    assert info["mimic"]["rows"] == 48 and info["mimic"]["bytes_per_token"] > 0
    assert info["pref"]["shards"] == "3/3"


def test_verify_catches_flipped_byte_and_truncation(hf_dump: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "dump"
    shutil.copytree(hf_dump, copy)
    assert verify_dump(copy) == []
    flipped, truncated = shard_paths(copy, "mimic")[0], shard_paths(copy, "pref")[1]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    problems = verify_dump(copy)
    assert len(problems) == 2
    assert any(flipped.name in p and "checksum" in p for p in problems)
    assert any(truncated.name in p and "truncated" in p for p in problems)


@pytest.mark.parametrize("edit,expected", [
    (lambda r: r[0]["rest_mass"].__setitem__(0, 1.5), "rest_mass holds values outside [0, 1]"),
    (lambda r: r[0]["target_logprobs"].__setitem__(0, 0.7), "target_logprobs holds log-probabilities above 0"),
    (lambda r: r[1]["topk_ids"][0].__setitem__(0, 10**6), "topk_ids holds ids outside the teacher's vocabulary"),
    (lambda r: r[2]["topk_logprobs"][0].__setitem__(1, float("nan")), "topk_logprobs holds NaN or infinite values"),
])
def test_verify_names_values_no_teacher_writes(edit, expected, hf_dump: Path, tmp_path: Path):
    """A shard edited by hand with its checksum updated passed `shards verify`."""
    import hashlib
    import shutil

    copy = tmp_path / "dump"
    shutil.copytree(hf_dump, copy)
    path = shard_paths(copy, "mimic")[0]
    rows = pq.read_table(path).to_pylist()
    edit(rows)
    pq.write_table(pa_table(rows, pq.read_schema(path)), path, compression="zstd")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][f"mimic/{path.name}"].update({"bytes": path.stat().st_size,
                                                     "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_dump(copy)
    assert len(problems) == 1 and problems[0].startswith(f"mimic/{path.name}: {expected}"), problems


def pa_table(rows: list[dict], schema):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=schema)


def test_verify_checks_the_teacher_tokenizer(hf_dump: Path, tmp_path: Path):
    """A deleted, corrupted or swapped teacher_tokenizer/ passed `shards verify`; students of
    another tokenizer read the stored ids through it."""
    import shutil

    from transformers import AutoTokenizer

    def copy(name: str) -> Path:
        out = tmp_path / name
        shutil.copytree(hf_dump, out)
        return out

    deleted = copy("deleted")
    shutil.rmtree(deleted / "teacher_tokenizer")
    corrupted = copy("corrupted")
    (corrupted / "teacher_tokenizer" / "tokenizer.json").write_text("{not json")
    swapped = copy("swapped")
    tok = AutoTokenizer.from_pretrained(str(swapped / "teacher_tokenizer"))
    tok.add_tokens(["<an-extra-token>"])
    tok.save_pretrained(str(swapped / "teacher_tokenizer"))
    for dump_dir, expected in ((deleted, "teacher_tokenizer/: missing"), (corrupted, "teacher_tokenizer/: unreadable"),
                               (swapped, "not the tokenizer the teacher dumped with")):
        problems = verify_dump(dump_dir)
        assert len(problems) == 1 and expected in problems[0], problems


def test_same_inputs_give_byte_identical_shards(hf_dump: Path, world: Path, teacher: Path, tmp_path: Path):
    from tests.conftest import dump

    dump(world, teacher, tmp_path / "again", "hf")
    for kind in ("mimic", "pref"):
        for a, b in zip(shard_paths(hf_dump, kind), shard_paths(tmp_path / "again", kind)):
            assert a.read_bytes() == b.read_bytes()
    assert (hf_dump / "manifest.json").read_bytes() == (tmp_path / "again" / "manifest.json").read_bytes()


def test_pref_schema_columns():
    names = set(PREF_SCHEMA.names)
    assert {"sample_id", "chosen_ids", "rejected_ids", "chosen_logprobs", "rejected_logprobs",
            "chosen_logprob_sum", "rejected_logprob_sum"} <= names


def test_vllm_prompt_logprobs_fallback_agrees_with_the_hidden_state_path(vllm_dump: Path, world: Path,
                                                                          teacher: Path, tmp_path: Path):
    """--vllm-scoring logprobs (every position's top-k from vLLM, the earlier path) stores what the
    default does (the head applied by the worker at the scored positions only); the default also
    draws RS-KD samples, which prompt_logprobs cannot."""
    from tests.conftest import dump

    assert Manifest.load(vllm_dump).run["vllm_scoring"] == "hidden"
    out = tmp_path / "logprobs"
    dump(world, teacher, out, "vllm", shards=1, vllm_scoring="logprobs")
    assert Manifest.load(out).run["vllm_scoring"] == "logprobs"
    for kind, keys in (("mimic", ("target_logprobs", "topk_logprobs")), ("pref", ("chosen_logprobs",))):
        old, new = read_kind(out, kind), read_kind(vllm_dump, kind)
        assert [r["sample_id"] for r in old] == [r["sample_id"] for r in new]
        for o, n in zip(old, new):
            for key in keys:
                np.testing.assert_allclose(o[key], n[key], atol=1e-3)
    drawn = tmp_path / "sampled"
    dump(world, teacher, drawn, "vllm", shards=1, sample=20)
    rows = read_kind(drawn, "mimic")
    assert all(sum(c) == 20 for r in rows for c in r["sampled_counts"])


def _vllm_worker_in_turn_and_pipelined(teacher: str, world: str, out: str) -> None:
    """Writes each shard in turn to OUT/in_turn, pipelined to OUT/pipelined. Run in a spawned process:
    vLLM's engine core lives in the worker's process, and a test process that forks later (DataLoader
    workers) must not carry its threads."""
    import shutil

    from shared.schema import shard_name
    from teacher_dump.inputs import count_rows, plan_slices
    from teacher_dump.worker import ShardTask, TeacherWorker

    worker = TeacherWorker(teacher, "vllm", {"max_model_len": 256, "max_top_k": TOP_K}, TOP_K, f"{out}/worker")
    worker.chunk_records = 5  # several chunks through the pipeline
    for mode in ("in_turn", "pipelined"):
        worker.pipelined = mode == "pipelined"
        for kind in ("mimic", "pref"):
            path, rel = Path(world) / f"{kind}.jsonl", shard_name(kind, 1, 3)
            worker.run_shard(ShardTask(kind, 1, rel, plan_slices(path, kind, 3, count_rows(path))[1]), 256)
            (Path(out) / mode / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(out) / "worker" / rel, Path(out) / mode / rel)


def test_a_vllm_worker_writes_the_same_bytes_pipelined_and_in_turn(vllm_dump: Path, world: Path, teacher: Path,
                                                                    tmp_path: Path):
    """A GPU worker overlaps preparing the next chunk and writing the last one with the engine's
    scoring (TeacherWorker.pipelined); with chunks of 5 records (several through the pipeline),
    mimic and pref shards are byte-identical to the steps in turn (vLLM's engine core schedules in
    the worker's process: same requests, same batches), and their values are the Ray dump's."""
    import multiprocessing

    from shared.schema import shard_name

    proc = multiprocessing.get_context("spawn").Process(
        target=_vllm_worker_in_turn_and_pipelined, args=(str(teacher), str(world), str(tmp_path)))
    proc.start()
    proc.join(600)
    if proc.is_alive():  # a hung engine must not outlive the test and hold the cores of the ones after it
        proc.kill()
        proc.join()
        raise AssertionError("the spawned vLLM worker did not finish in 600 s; killed")
    assert proc.exitcode == 0, f"the spawned vLLM worker exited with {proc.exitcode}"
    for kind, key in (("mimic", "topk_logprobs"), ("pref", "chosen_logprobs")):
        rel = shard_name(kind, 1, 3)
        in_turn, pipelined = tmp_path / "in_turn" / rel, tmp_path / "pipelined" / rel
        assert in_turn.read_bytes() == pipelined.read_bytes()
        got, want = pq.read_table(in_turn).to_pylist(), pq.read_table(vllm_dump / rel).to_pylist()
        assert len(got) > 5 and [g["sample_id"] for g in got] == [w["sample_id"] for w in want]
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.concatenate([np.ravel(x) for x in g[key]]),
                                       np.concatenate([np.ravel(x) for x in w[key]]), atol=1e-4)


_HELPER_MISSES = """
import json, sys
from pathlib import Path
import numpy as np
from shared.mllm import load_encoder
from teacher_dump.backends import make_backend
from teacher_dump.inputs import read_records
from teacher_dump.worker import prepare, score_items
teacher, world = Path(sys.argv[1]), Path(sys.argv[2])
records = [r for r in read_records(world / "mimic.jsonl", "mimic", world)[0] if r.images][:6]
exact = load_encoder(teacher)
truth = [prepare(exact, r, keep_tensors=False) for r in records]  # the full processor's runs
lying = load_encoder(teacher)
assert lying._count_helper_usable, "this family's processor has no count helper"
lying._count_checks_left = 0  # trusted, as after it agreed on the first images
real, calls = lying._helper_count, []
def helper(image):  # right on the first images, 3 tokens short of the processor on the 4th
    calls.append(1)
    return real(image) + (3 if len(calls) == 4 else 0)
lying._helper_count = helper
items = [prepare(lying, r, keep_tensors=False, count_only=True) for r in records]
counted_wrong = [len(i.sequences[0].ids) for i in items] != [len(i.sequences[0].ids) for i in truth]
backend = make_backend("vllm", teacher, max_model_len=256, max_top_k=8, max_images=1)
got = score_items(backend, lying, items, 8)
want = score_items(backend, exact, truth, 8)
print(json.dumps({
    "counted_wrong": counted_wrong,
    "ids_repaired": [i.sequences[0].ids for i in items] == [i.sequences[0].ids for i in truth],
    "same_scores": all(np.array_equal(a.topk_ids, b.topk_ids) and np.allclose(a.topk_logprobs, b.topk_logprobs,
                                                                              atol=1e-5) for a, b in zip(got, want)),
    "helper_trusted_after": lying._count_helper_usable,
}))
"""


def test_a_count_helper_that_misses_a_later_image_does_not_stop_the_vllm_dump(teacher, world):
    """vLLM's processor expands the images; the worker's runs are counted by the processor's size
    helper once it agreed on the first images. A helper 3 tokens short on a later image made vLLM's
    pooler index past the prompt (an IndexError that stopped the whole dump). Now the chunk's images
    go through the full processor, the helper is no longer trusted, and the scores equal those of
    exact runs. (vLLM runs in a subprocess: one engine per process.)"""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _HELPER_MISSES, str(teacher), str(world)], capture_output=True,
                         text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"counted_wrong": True, "ids_repaired": True,
                                                               "same_scores": True, "helper_trusted_after": False}


@pytest.mark.distributed
def test_a_dump_on_a_two_node_cluster_survives_losing_a_node(teacher, world, tmp_path, capfd):
    """`--address` onto a running Ray cluster of two nodes (two raylets on this machine, one CPU
    each: one teacher worker per node). The second node is removed once the first shard is
    finished, with its worker mid-shard: that shard is redone by the surviving worker and the dump
    completes, byte-identical to a one-node dump with the same threads per worker. (A worker's
    thread count is part of its numerics: matmul reductions split by thread.)"""
    import filecmp
    import threading
    import time

    from ray.cluster_utils import Cluster

    from shared.shards import shard_paths
    from teacher_dump.run import DumpConfig, dump_teacher

    def config(out: Path, **kw) -> DumpConfig:
        return DumpConfig(model=teacher, out=out, mimic_data=world / "mimic.jsonl", pref_data=world / "pref.jsonl",
                          shards=8, top_k=TOP_K, backend="hf", max_model_len=256, progress=False, encoding="f32",
                          workers=2, **kw)

    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    removed = threading.Event()

    def remove_second_node_after_the_first_shard() -> None:
        manifest = tmp_path / "two" / "manifest.json"
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if json.loads(manifest.read_text()).get("shards"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        cluster.remove_node(second)
        removed.set()

    killer = threading.Thread(target=remove_second_node_after_the_first_shard, daemon=True)
    killer.start()
    try:
        dump_teacher(config(tmp_path / "two", address=cluster.address))
    finally:
        killer.join(timeout=300)
        cluster.shutdown()
    assert removed.is_set()
    assert "a teacher worker died while writing" in capfd.readouterr().err
    dump_teacher(config(tmp_path / "one"))  # a local Ray of this machine's 2 CPUs: 2 workers, 1 thread each
    names = {kind: [p.name for p in shard_paths(tmp_path / "one", kind)] for kind in ("mimic", "pref")}
    assert names == {kind: [p.name for p in shard_paths(tmp_path / "two", kind)] for kind in ("mimic", "pref")}
    assert sum(map(len, names.values())) == 16
    for kind, files in names.items():
        for name in files:
            assert filecmp.cmp(tmp_path / "one" / kind / name, tmp_path / "two" / kind / name, shallow=False), name
    assert verify_dump(tmp_path / "two") == []
