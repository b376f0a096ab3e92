"""Compact shards (format version 2): the encodings against the exact values, on random
distributions and on a real dump; version-1 dumps stay readable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shared.codec import Encoding, read_table
from shared.schema import row_images
from shared.shards import dump_info, shard_paths, verify_dump


def _teacher(rng: np.random.Generator, positions: int, vocab: int) -> np.ndarray:
    """Zipf-like log-probs: a frequency prior over ids plus per-position context."""
    logits = -1.1 * np.log(np.arange(1, vocab + 1)) + rng.normal(0, 2.0, (positions, vocab))
    return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def _encoded_table(enc: Encoding, logp: np.ndarray, k: int, split: list[int]) -> tuple[pa.Table, np.ndarray]:
    top = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    lps = np.take_along_axis(logp, top, -1)
    rest = np.clip(1 - np.exp(lps).sum(-1), 0, 1)
    rows, start = [], 0
    for n in split:  # rows of n positions each (0 allowed)
        ids, q = enc.encode_topk(top[start : start + n], lps[start : start + n])
        targets = enc.encode_targets(lps[start : start + n, 0])
        rows.append({"target_logprobs": targets, "topk_ids": ids, "topk_logprobs": q,
                     "rest_mass": rest[start : start + n].astype(np.float32)})
        start += n
    schema = pa.schema([pa.field("target_logprobs", pa.list_(enc.target_type())),
                        pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),
                        pa.field("topk_logprobs", pa.list_(pa.list_(enc.logprob_type()))),
                        pa.field("rest_mass", pa.list_(pa.float32()))])
    return pa.Table.from_pylist(rows, schema=schema), top


@pytest.mark.parametrize("name,kl_bound", [("u8", 1e-3), ("u16", 1e-5)])
def test_quantised_shards_decode_to_a_normalised_close_distribution(name, kl_bound):
    rng = np.random.default_rng(0)
    vocab, k, split = 3000, 64, [5, 0, 7, 12, 1]
    logp = _teacher(rng, sum(split), vocab)
    enc = Encoding(name)
    table, top = _encoded_table(enc, logp, k, split)
    decoded = enc.decode(table.slice(0))  # a zero-offset slice: the reader's case
    assert enc.decode(table.slice(1, 3)).num_rows == 3  # a sliced table decodes too
    ids = [np.array(p) for row in decoded.column("topk_ids").to_pylist() for p in row]
    lps = [np.array(p) for row in decoded.column("topk_logprobs").to_pylist() for p in row]
    rest = np.concatenate([np.array(r) for r in decoded.column("rest_mass").to_pylist()])
    kls = []
    for t, (i, lp) in enumerate(zip(ids, lps)):
        assert np.array_equal(i, np.sort(top[t]))  # delta coding is lossless
        total = np.exp(lp.astype(np.float64)).sum() + rest[t]
        assert abs(total - 1) < 1e-5  # renormalised: quantisation moves mass, never loses it
        exact = logp[t, i]
        if name == "u16":  # half a step of 1/256 nat, plus the renormalisation
            assert np.abs(lp - exact).max() < 1 / 256
        else:  # half a step of 1/255 in sqrt(p), plus the renormalisation (at most a step)
            assert np.abs(np.sqrt(np.exp(lp)) - np.sqrt(np.exp(exact))).max() < 1 / 255
        exact_rest = max(1 - np.exp(exact).sum(), 1e-30)
        kl = []
        for top_lp, rest_t in ((lp, rest[t]), (exact, exact_rest)):  # stored vs exact top-k + rest
            q = np.full(vocab, np.log(max(rest_t, 1e-30) / (vocab - k)))
            q[i] = top_lp
            kl.append(float((np.exp(logp[t]) * (logp[t] - q)).sum()))
        kls.append(kl[0] - kl[1])  # what quantisation adds to the truncation's KL
    assert 0 <= np.mean(kls) < kl_bound, np.mean(kls)
    targets = np.concatenate([np.array(r) for r in decoded.column("target_logprobs").to_pylist()])
    np.testing.assert_allclose(targets, np.sort(logp, -1)[:, -1], atol=1 / 512 + 1e-6)
    assert Encoding("f32").decode(table) is table


def test_the_default_dump_is_compact_verified_and_read_by_every_reader(u8_dump: Path, hf_dump: Path):
    import datasets
    import duckdb

    assert verify_dump(u8_dump) == []
    small, exact = dump_info(u8_dump)["mimic"], dump_info(hf_dump)["mimic"]
    # k=4 here: the prompt text dominates the rows, the per-token columns shrink much more
    assert small["tokens"] == exact["tokens"] and small["bytes"] < 0.85 * exact["bytes"], (small, exact)
    assert dump_info(u8_dump)["encoding"] == "u8"
    files = [str(p) for p in shard_paths(u8_dump, "mimic")]
    raw = pq.read_table(files[0])
    assert raw.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.uint8()))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert ds.num_rows == 48 and all(0 <= v <= 255 for v in ds[0]["topk_logprobs"][0])
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0] == 48
    for f_small, f_exact in zip(shard_paths(u8_dump, "mimic"), shard_paths(hf_dump, "mimic"), strict=True):
        for a, b in zip(read_table(f_small).to_pylist(), read_table(f_exact).to_pylist(), strict=True):
            assert a["response_ids"] == b["response_ids"] and a["sample_id"] == b["sample_id"]
            for ids_a, lp_a, ids_b, lp_b in zip(a["topk_ids"], a["topk_logprobs"], b["topk_ids"], b["topk_logprobs"]):
                by_id = dict(zip(ids_b, lp_b))
                assert set(ids_a) == set(ids_b)
                for i, v in zip(ids_a, lp_a):  # 8 bits on a sqrt(p) scale
                    assert abs(np.exp(v / 2) - np.exp(by_id[i] / 2)) < 1 / 255, (v, by_id[i])


def test_a_version_1_dump_stays_readable(hf_dump: Path, world: Path, tmp_path: Path):
    """A dump as lmod wrote it before format version 2: files without an encoding in their
    metadata and a manifest of version 1 without one."""
    import hashlib

    from student_train.data import load_mimic

    old = tmp_path / "v1"
    shutil.copytree(hf_dump, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["run"]["encoding"]
    for path in shard_paths(old, "mimic") + shard_paths(old, "pref"):
        table = pq.read_table(path)
        if "sampled_ids" in table.column_names:
            table = table.drop_columns(["sampled_ids", "sampled_counts"])  # version 1 had none
        # versions 1-2: one image per row, one string per column ("" for no image)
        for name, empty in (("image", None), ("image_sha256", "")):
            one = pa.array([v[0] if v else empty for v in table.column(name).to_pylist()], pa.string())
            table = table.set_column(table.schema.get_field_index(name), name, one)
        meta = {k: v for k, v in table.schema.metadata.items() if k != b"lmod.encoding"}
        meta[b"lmod.format_version"] = b"1"
        pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd")
        entry = manifest["shards"][f"{path.parent.name}/{path.name}"]
        entry.update({"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    (old / "manifest.json").write_text(json.dumps(manifest))
    assert verify_dump(old) == [] and dump_info(old)["encoding"] == "f32"
    got = [r for p in shard_paths(old, "mimic") for r in read_table(p).to_pylist()]
    want = [{k: v for k, v in r.items() if not k.startswith("sampled_")}
            for p in shard_paths(hf_dump, "mimic") for r in read_table(p).to_pylist()]
    assert [row_images(r["image"], r["image_sha256"]) for r in got] == \
        [row_images(r["image"], r["image_sha256"]) for r in want]
    drop = ("image", "image_sha256")
    assert [{k: v for k, v in r.items() if k not in drop} for r in got] == \
        [{k: v for k, v in r.items() if k not in drop} for r in want]
    a, b = load_mimic(shard_paths(old, "mimic"), world), load_mimic(shard_paths(hf_dump, "mimic"), world)
    assert [e.topk_logprobs for e in a] == [e.topk_logprobs for e in b] and len(a) == 48
    assert [np.asarray(e.images[0]).tolist() for e in a[:3]] == [np.asarray(e.images[0]).tolist() for e in b[:3]]
