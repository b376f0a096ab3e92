"""Bad input is refused before the teacher starts, with one line naming file and row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from shared.manifest import Manifest
from tests.conftest import dump

pytestmark = pytest.mark.integration


def _copy_world(world: Path, tmp_path: Path) -> Path:
    out = tmp_path / "w"
    shutil.copytree(world, out)
    return out


def _rewrite(path: Path, row: int, fn) -> None:
    lines = path.read_text().splitlines()
    lines[row] = fn(lines[row])
    path.write_text("\n".join(lines) + "\n")


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def _dump_args(w: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return ["dump-teacher", "--model", str(teacher), "--mimic-data", str(w / "mimic.jsonl"),
            "--pref-data", str(w / "pref.jsonl"), "--out", str(out), "--backend", "hf", "--shards", "2",
            "--top-k", "4", "--max-model-len", "256", *extra]


def _error(res) -> str:
    """The one error line, last (after the plan line and the validators' progress)."""
    errors = [line for line in res.output.splitlines() if line.startswith("lmod: error:")]
    assert len(errors) == 1, res.output
    assert res.output.rstrip().endswith(errors[0]), res.output
    return errors[0]


def _no_shards(out: Path) -> bool:
    return not out.exists() or not list(out.rglob("*.parquet"))


def _set(key, value):
    def fn(line: str) -> str:
        rec = json.loads(line)
        if value is None:
            rec.pop(key)
        else:
            rec[key] = value
        return json.dumps(rec)
    return fn


@pytest.mark.parametrize(
    "kind,row,fn,expected",
    [
        ("mimic", 5, _set("image", "images/nope.png"), "image not found"),
        ("mimic", 7, lambda line: line[:-3], "malformed JSON"),
        ("mimic", 2, _set("conversations", [{"from": "human", "value": "<image>\nhi"}]), "no response"),
        ("pref", 4, _set("rejected", None), "'rejected' missing"),
        ("pref", 3, _set("chosen", "a red<end_of_utterance> circle"), "answer of turn 1 contains '<end_of_utterance>'"),
        ("mimic", 4, _set("conversations", [{"from": "human", "value": "<image>\nhi<end_of_utterance>\nAssistant: no"},
                                            {"from": "gpt", "value": "yes"}]), "question of turn 0 contains"),
    ],
)
def test_bad_record_is_named_and_nothing_is_written(world, teacher, tmp_path, kind, row, fn, expected):
    w = _copy_world(world, tmp_path)
    _rewrite(w / f"{kind}.jsonl", row, fn)
    out = tmp_path / "out"
    res = _cli(*_dump_args(w, teacher, out))
    assert res.exit_code == 2
    msg = _error(res)
    assert f"{kind}.jsonl:{row + 1}" in msg and expected in msg and "--skip-invalid" in msg
    assert _no_shards(out)


def test_skip_invalid_records_reasons_and_dumps_the_rest(world, teacher, tmp_path):
    w = _copy_world(world, tmp_path)
    _rewrite(w / "mimic.jsonl", 5, _set("image", "images/nope.png"))
    _rewrite(w / "pref.jsonl", 4, _set("rejected", None))
    out = tmp_path / "out"
    res = _cli(*_dump_args(w, teacher, out, "--skip-invalid"))
    assert res.exit_code == 0, res.output
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["row"]) for r in rejected] == [("mimic-000005", 5), ("pref-000004", 4)]
    assert "image not found" in rejected[0]["reason"]
    m = Manifest.load(out)
    assert sum(e.rows for e in m.shards.values() if e.kind == "mimic") == 47
    assert sum(e.rows for e in m.shards.values() if e.kind == "pref") == 23


@pytest.mark.fast
def test_zero_shards_refused(world, teacher, tmp_path):
    res = _cli(*_dump_args(world, teacher, tmp_path / "out")[:-8], "--shards", "0")
    assert res.exit_code == 2 and "--shards must be >= 1" in res.output
    assert _no_shards(tmp_path / "out")


def test_other_teacher_or_k_refused_unless_force(world, teacher, tmp_path):
    out = tmp_path / "out"
    dump(world, teacher, out, "hf", shards=2, top_k=4, encoding="u8")  # as the CLI runs below
    old_config = Manifest.load(out).run["teacher"]["config_sha256"]
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    res = _cli(*[a if a != "4" else "6" for a in _dump_args(world, teacher, out)])  # --top-k 6
    assert res.exit_code == 2 and "another top k" in res.output and "--force" in res.output
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before  # nothing touched

    other = tmp_path / "other_teacher"
    shutil.copytree(teacher, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["text_config"]["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(cfg))
    res = _cli(*_dump_args(world, other, out))
    assert res.exit_code == 2 and "another teacher" in res.output
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before

    res = _cli(*_dump_args(world, other, out, "--force"))
    assert res.exit_code == 0, res.output
    assert Manifest.load(out).run["teacher"]["config_sha256"] != old_config


def test_rerun_of_a_finished_dump_skips_everything(world, teacher, tmp_path):
    out = tmp_path / "out"
    dump(world, teacher, out, "hf", shards=2, top_k=4, encoding="u8")  # as the CLI runs below
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    res = _cli(*_dump_args(world, teacher, out))
    assert res.exit_code == 0, res.output
    assert "4 already finished, 0 to run" in res.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes


def test_datasets_dir_and_parquet_inputs_with_image_bytes(world, teacher, tmp_path, hf_dump):
    """A `datasets` directory with an Image column (bytes) dumps the same rows as JSONL + paths."""
    import datasets
    import pyarrow.parquet as pq

    from shared.shards import shard_paths

    recs = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()]
    for r in recs:
        r["image"] = str(world / r["image"])
    ds = datasets.Dataset.from_list(recs).cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "pref_ds"))
    out = tmp_path / "out"
    res = _cli("dump-teacher", "--model", str(teacher), "--pref-data", str(tmp_path / "pref_ds"), "--out", str(out),
               "--backend", "hf", "--shards", "3", "--top-k", "8", "--max-model-len", "256")
    assert res.exit_code == 0, res.output
    got = [r for p in shard_paths(out, "pref") for r in pq.read_table(p).to_pylist()]
    want = [r for p in shard_paths(hf_dump, "pref") for r in pq.read_table(p).to_pylist()]
    assert [r["chosen_logprobs"] for r in got] == [r["chosen_logprobs"] for r in want]
    assert [r["image_sha256"] for r in got] == [r["image_sha256"] for r in want]


def test_image_token_inside_an_answer_and_a_truncated_png_are_named(world, teacher, tmp_path):
    w = _copy_world(world, tmp_path)
    _rewrite(w / "mimic.jsonl", 3, lambda line: json.dumps({**json.loads(line), "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a <image> circle"}]}))
    rec = json.loads((w / "mimic.jsonl").read_text().splitlines()[6])
    png = w / rec["image"]
    png.write_bytes(png.read_bytes()[:-200])  # the header still reads; the pixels do not
    out = tmp_path / "out"
    res = _cli(*_dump_args(w, teacher, out, "--skip-invalid"))
    assert res.exit_code == 0, res.output
    reasons = {r["row"]: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert "inside an answer" in reasons[3] and "cannot be decoded" in reasons[6], reasons


@pytest.mark.parametrize("extra,expected", [(["--dtype", "fp32"], "--dtype 'fp32'"),
                                            (["--workers", "0"], "--workers must be >= 1")])
@pytest.mark.fast
def test_bad_options_get_one_line(world, teacher, tmp_path, extra, expected):
    res = _cli(*_dump_args(world, teacher, tmp_path / "out", *extra))
    assert res.exit_code == 2 and expected in res.output and len(res.output.strip().splitlines()) == 1
    assert _no_shards(tmp_path / "out")


def test_recovery_copied_teacher_broken_manifest_empty_run_and_file_out(world, teacher, tmp_path):
    out = tmp_path / "out"
    dump(world, teacher, out, "hf", shards=2, top_k=4, encoding="u8")  # as the CLI runs below
    copied = tmp_path / "elsewhere" / "same_teacher"
    shutil.copytree(teacher, copied)
    res = _cli(*_dump_args(world, copied, out))  # the same weights in another place: resume, not refuse
    assert res.exit_code == 0 and "4 already finished" in res.output, res.output

    (out / "manifest.json").write_text("{ not json")
    res = _cli(*_dump_args(world, teacher, out))
    assert res.exit_code == 2 and "manifest.json: unreadable" in res.output and "--force" in res.output
    res = _cli(*_dump_args(world, teacher, out, "--force"))
    assert res.exit_code == 0, res.output

    # A run that died before its first shard (e.g. a vLLM start-up error) does not block a corrected one.
    stalled = tmp_path / "stalled"
    stalled.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(shards={}, run={**manifest["run"], "dtype": "bfloat16"})
    (stalled / "manifest.json").write_text(json.dumps(manifest))
    res = _cli(*_dump_args(world, teacher, stalled))
    assert res.exit_code == 0, res.output
    bare = tmp_path / "bare"
    (bare / "mimic").mkdir(parents=True)  # an empty kind folder and no manifest: no shards to protect
    res = _cli(*_dump_args(world, teacher, bare))
    assert res.exit_code == 0, res.output

    (tmp_path / "a_file").write_text("x")
    res = _cli(*_dump_args(world, teacher, tmp_path / "a_file"))
    assert res.exit_code == 2 and "is not a directory" in res.output


def test_a_second_dump_into_the_same_out_is_locked_out_and_stale_temp_files_go(world, teacher, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".lmod-dump.lock", "a+") as held:  # as a running dump holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242\n")
        held.flush()
        res = _cli(*_dump_args(world, teacher, out))
    assert res.exit_code == 2 and "another lmod dump-teacher is writing here (pid 4242)" in res.output
    assert not (out / "manifest.json").exists()
    # A JSON-list input is converted into OUT: a second dump rewrote the running one's converted
    # input before the lock refused it. It is now refused before it writes anything.
    (out / "inputs").mkdir()
    running = out / "inputs" / "mimic.jsonl"
    running.write_text("the running dump's records\n")
    as_list = tmp_path / "other.json"
    as_list.write_text(json.dumps([json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()]))
    args = _dump_args(world, teacher, out)
    args[args.index("--mimic-data") + 1] = str(as_list)
    with open(out / ".lmod-dump.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = _cli(*args)
    assert res.exit_code == 2 and "another lmod dump-teacher is writing here" in res.output
    assert running.read_text() == "the running dump's records\n"
    assert sorted(p.name for p in (out / "inputs").iterdir()) == ["mimic.jsonl"]
    import shutil

    shutil.rmtree(out / "inputs")
    (out / "mimic").mkdir()
    stale = out / "mimic" / ".shard-00000-of-00002.parquet.tmp-999"
    stale.write_bytes(b"half a shard")
    res = _cli(*_dump_args(world, teacher, out))
    assert res.exit_code == 0, res.output
    assert not stale.exists()


@pytest.mark.fast
def test_max_model_len_beyond_the_models_positions_is_refused(world, teacher, tmp_path):
    args = [a if a != "256" else "4096" for a in _dump_args(world, teacher, tmp_path / "out")]
    res = _cli(*args)
    assert res.exit_code == 2 and "--max-model-len 4096 exceeds the 512 positions" in res.output


def test_dry_run_validates_everything_and_prints_the_plan_without_a_teacher(world, teacher, tmp_path):
    w = _copy_world(world, tmp_path)
    out = tmp_path / "out"
    res = _cli(*_dump_args(w, teacher, out, "--dry-run"))
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)  # stdout is the plan alone (progress and Ray's logs go to stderr)
    assert [s["records"] for s in plan["shards"]["mimic"]] == [24, 24] and plan["encoding"] == "u8"
    assert plan["shards"]["pref"][1]["input_rows"] == [12, 24]
    assert not out.exists()  # nothing written, no lock taken
    _rewrite(w / "mimic.jsonl", 5, _set("image", "images/nope.png"))
    res = _cli(*_dump_args(w, teacher, out, "--dry-run"))
    assert res.exit_code == 2 and "mimic-000005" in res.output and not out.exists()


def _raw_rows(path: Path) -> list[tuple[int, dict]]:
    """Every record of a JSONL file with its line number, read the plain way."""
    return [(i, json.loads(line)) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]


@pytest.mark.fast
def test_shards_are_planned_from_row_counts_and_slices_cover_every_row_once(world, tmp_path):
    """JSONL (a blank line, no final newline), Parquet (row groups of 5), a datasets directory and
    a JSON list: any number of shards reads each row exactly once, as the plain reader does."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from teacher_dump.inputs import count_rows, iter_slice, plan_slices

    lines = (world / "mimic.jsonl").read_text().splitlines()
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(lines[:10] + [""] + lines[10:]))  # row 10 is blank; no newline at the end
    want = _raw_rows(jsonl)
    records = [r for _, r in want]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet", row_group_size=5)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "m_ds"))
    (tmp_path / "m.json").write_text(json.dumps(records))
    for path, expected in [(jsonl, want), *[(tmp_path / name, list(enumerate(records)))
                                            for name in ("m.parquet", "m_ds", "m.json")]]:
        rows = count_rows(path)
        assert rows == (49 if path == jsonl else 48)
        for n in (1, 3, 7, 100):
            slices = plan_slices(path, "mimic", n, rows)
            assert len(slices) == min(n, rows) and slices[0].lo == 0 and slices[-1].hi == rows
            assert all(a.hi == b.lo for a, b in zip(slices, slices[1:]))
            got = [(row, rec) for sl in slices for row, rec, err in iter_slice(sl)]
            assert got == expected, (path, n)


def test_an_id_repeated_in_another_shard_is_refused_with_both_rows(world, teacher, tmp_path):
    w = _copy_world(world, tmp_path)
    _rewrite(w / "mimic.jsonl", 40, _set("id", "mimic-000003"))  # shard 1 of 2 repeats an id of shard 0
    res = _cli(*_dump_args(w, teacher, tmp_path / "out", "--dry-run"))
    assert res.exit_code == 2
    assert "mimic.jsonl:41 (id mimic-000003): duplicate id 'mimic-000003' (first at row 3)" in _error(res)
    res = _cli(*_dump_args(w, teacher, tmp_path / "out", "--dry-run", "--skip-invalid"))
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert [(s["records"], s["rejected"]) for s in plan["shards"]["mimic"]] == [(24, 0), (23, 1)]
    assert plan["records"] == 71 and plan["rejected"] == 1
    # which record and why, not only how many (the real run writes them to OUT/rejected.jsonl)
    (refusal,) = plan["refusals"]
    assert (refusal["row"], refusal["id"]) == (40, "mimic-000003") and "duplicate id" in refusal["reason"]
    assert refusal["file"].endswith("mimic.jsonl") and not (tmp_path / "out").exists()


def test_a_resumed_dump_reuses_its_validation_and_keeps_refusing_without_skip_invalid(world, teacher, tmp_path):
    w = _copy_world(world, tmp_path)
    _rewrite(w / "mimic.jsonl", 5, _set("image", "images/nope.png"))
    out = tmp_path / "out"
    res = _cli(*_dump_args(w, teacher, out, "--skip-invalid"))
    assert res.exit_code == 0, res.output
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    lost = out / "mimic" / "shard-00000-of-00002.parquet"
    lost.unlink()
    res = _cli(*_dump_args(w, teacher, out, "--skip-invalid"))
    assert res.exit_code == 0 and "3 already finished, 1 to run" in res.output, res.output
    assert "validating inputs" not in res.output  # the first run's refusals (rejected.jsonl) are reused
    assert {p: p.read_bytes() for p in out.rglob("*.parquet")} == before
    lost.unlink()
    res = _cli(*_dump_args(w, teacher, out))
    assert res.exit_code == 2 and "mimic.jsonl:6 (id mimic-000005): image not found" in _error(res)
    assert not lost.exists()


def test_a_worker_scoring_in_chunks_writes_the_same_rows(world, teacher, tmp_path, hf_dump):
    """The teacher scores a shard a chunk of records at a time and writes row groups as they fill:
    chunks of 5 give the fixture's rows (chunks of 32; values to float rounding, as the batches'
    padding differs), and the same chunking gives the same bytes twice, pipelined (the next chunk
    prepared and the last one written by threads while this one is scored) or one step at a time."""
    import numpy as np
    import pyarrow.parquet as pq

    from shared.schema import shard_name
    from teacher_dump.inputs import count_rows, plan_slices
    from teacher_dump.worker import ShardTask, TeacherWorker
    from tests.conftest import TOP_K

    path = world / "mimic.jsonl"
    sl = plan_slices(path, "mimic", 3, count_rows(path))[1]
    worker = TeacherWorker(str(teacher), "hf", {"dtype": "float32"}, TOP_K, str(tmp_path), "f32")
    worker.chunk_records = 5
    rel = shard_name("mimic", 1, 3)
    _, entry = worker.run_shard(ShardTask("mimic", 1, rel, sl), 256)
    first = (tmp_path / rel).read_bytes()
    _, again = worker.run_shard(ShardTask("mimic", 1, rel, sl), 256)
    assert (tmp_path / rel).read_bytes() == first and again == entry
    assert not worker.pipelined  # no GPU: the steps in turn; the GPU's pipeline must write the same bytes
    worker.pipelined = True
    _, pipelined = worker.run_shard(ShardTask("mimic", 1, rel, sl), 256)
    assert (tmp_path / rel).read_bytes() == first and pipelined == entry
    got, want = pq.read_table(tmp_path / rel).to_pylist(), pq.read_table(hf_dump / rel).to_pylist()
    assert entry.rows == len(want) == 16 and entry.input_range == [16, 32]
    for g, w in zip(got, want):
        assert g["sample_id"] == w["sample_id"] and g["response_ids"] == w["response_ids"]
        assert g["topk_ids"][0] == w["topk_ids"][0]
        np.testing.assert_allclose(np.concatenate(g["topk_logprobs"]), np.concatenate(w["topk_logprobs"]), atol=1e-4)


def test_a_json_list_is_converted_once_into_the_dump_and_teaches_what_jsonl_does(world, teacher, tmp_path, hf_dump):
    """LLaVA's mix is one ~1 GB JSON list: it is streamed once into OUT/inputs/mimic.jsonl (its sha256
    in the manifest), which every reader then seeks in; a rerun reuses it; rows equal the JSONL dump's."""
    import pyarrow.parquet as pq

    from shared.shards import shard_paths
    from teacher_dump.run import DumpConfig, dump_teacher

    w = _copy_world(world, tmp_path)
    records = [json.loads(line) for line in (w / "mimic.jsonl").read_text().splitlines()]
    (w / "mimic.json").write_text(json.dumps(records, indent=1))
    out = tmp_path / "out"
    cfg = DumpConfig(model=teacher, out=out, mimic_data=w / "mimic.json", pref_data=w / "pref.jsonl", shards=3,
                     top_k=8, backend="hf", max_model_len=256, progress=False, encoding="f32")
    manifest = dump_teacher(cfg)  # image paths relative to the list's folder, not to OUT/inputs
    converted = out / "inputs" / "mimic.jsonl"
    assert [json.loads(line) for line in converted.read_text().splitlines()] == records
    assert manifest.run["inputs"]["mimic"]["converted"]["path"] == "inputs/mimic.jsonl"
    rows = lambda d: [r for p in shard_paths(d, "mimic") for r in pq.read_table(p).to_pylist()]  # noqa: E731
    assert rows(out) == rows(hf_dump)
    stamps = {p: p.stat().st_mtime_ns for p in [converted, *out.rglob("*.parquet")]}
    assert dump_teacher(cfg).shards == manifest.shards
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing converted or scored again


def test_a_resume_whose_refusals_were_lost_revalidates_and_keeps_its_finished_shards(world, teacher, tmp_path):
    out = tmp_path / "out"
    dump(world, teacher, out, "hf", shards=2, top_k=4, encoding="u8")  # as the CLI runs below
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    (out / "rejected.jsonl").unlink()
    res = _cli(*_dump_args(world, teacher, out))
    assert res.exit_code == 0, res.output
    assert "4 already finished, 0 to run" in res.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes
    assert (out / "rejected.jsonl").is_file() and len(Manifest.load(out).shards) == 4
    # --dry-run refuses what the real run would: here, another k than the dump's
    res = _cli(*_dump_args(world, teacher, out, "--dry-run", "--top-k", "5"))
    assert res.exit_code == 2 and "holds shards of another top k" in _error(res), res.output


def test_skip_invalid_with_every_record_refused_still_says_why(world, teacher, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "mimic.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "conversations": "nope"}) + "\n"
                                           for i in range(3)))
    out = tmp_path / "out"
    res = _cli("dump-teacher", "--model", str(teacher), "--mimic-data", str(w / "mimic.jsonl"), "--out", str(out),
               "--backend", "hf", "--skip-invalid", "--max-model-len", "256")
    assert res.exit_code == 2 and "no valid records to dump (3 refused" in _error(res)
    reasons = [json.loads(line)["reason"] for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert len(reasons) == 3 and all("turn" in r or "conversations" in r for r in reasons), reasons


def _trl_messages(turns: list[dict]) -> list[dict]:
    out = []
    for t in turns:
        if t["from"] == "human":
            parts = [{"type": "image"}] if "<image>" in t["value"] else []
            out.append({"role": "user", "content": [*parts, {"type": "text",
                                                              "text": t["value"].replace("<image>\n", "")}]})
        else:
            out.append({"role": "assistant", "content": [{"type": "text", "text": t["value"]}]})
    return out


def test_hugging_face_formats_teach_what_lmods_own_format_does(world, teacher, tmp_path):
    """Files written the way each tool writes them: TRL's conversational `messages` + `images` (a
    `datasets` directory, images inline), TRL's vision preference format (`images`, `prompt`,
    `chosen`, `rejected` as message lists; Parquet by `datasets`), raw RLAIF-V (`image` as {bytes,
    path} with a bare file name, `idx`, no `id`; Parquet) and `conversations` as a JSON string
    (Parquet). Every stored value equals the dump of the same records in lmod's own JSONL."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from shared.shards import shard_paths
    from teacher_dump.run import DumpConfig, dump_teacher

    mimic = [json.loads(line) for line in (world / "mimic.jsonl").read_text().splitlines()[:6]]
    pref = [json.loads(line) for line in (world / "pref.jsonl").read_text().splitlines()[:6]]
    own = tmp_path / "own"
    own.mkdir()
    (own / "mimic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mimic))
    (own / "pref.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pref))
    png = {r["image"]: (world / r["image"]).read_bytes() for r in mimic + pref}
    pil = {k: Image.open(world / k).convert("RGB") for k in png}

    trl_chat = datasets.Dataset.from_dict({"messages": [_trl_messages(r["conversations"]) for r in mimic],
                                           "images": [[pil[r["image"]]] for r in mimic]})
    trl_chat.save_to_disk(str(tmp_path / "trl_chat"))
    trl_pref = datasets.Dataset.from_dict({
        "images": [[pil[r["image"]]] for r in pref],
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                    "text": r["question"].replace("<image>\n", "")}]}]
                   for r in pref],
        "chosen": [[{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}] for r in pref],
        "rejected": [[{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}] for r in pref]})
    trl_pref.to_parquet(str(tmp_path / "trl_pref.parquet"))
    pq.write_table(pa.Table.from_pylist([
        {"id": r["id"], "image": r["image"], "conversations": json.dumps(r["conversations"])} for r in mimic]),
        tmp_path / "conv_string.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"idx": i, "image": {"bytes": png[r["image"]], "path": Path(r["image"]).name}, "question": r["question"],
         "chosen": r["chosen"], "rejected": r["rejected"]} for i, r in enumerate(pref)]),
        tmp_path / "rlaif_v.parquet")

    def rows(mimic_data: Path, pref_data: Path, name: str) -> dict:
        out = tmp_path / name
        dump_teacher(DumpConfig(model=teacher, out=out, mimic_data=mimic_data, pref_data=pref_data, shards=1, top_k=8,
                                backend="hf", max_model_len=256, progress=False, encoding="f32", image_root=world))
        return {k: [r for p in shard_paths(out, k) for r in pq.read_table(p).to_pylist()] for k in ("mimic", "pref")}

    want = rows(own / "mimic.jsonl", own / "pref.jsonl", "d_own")
    # inline images are re-encoded PNGs; TRL places the image explicitly in the question
    drop = {"sample_id", "input_row", "image", "image_sha256", "question"}

    def same(got: list[dict], ref: list[dict]) -> None:
        assert len(got) == len(ref) == 6
        for g, r in zip(got, ref):
            assert {k: v for k, v in g.items() if k not in drop} == {k: v for k, v in r.items() if k not in drop}

    for mimic_data, pref_data in [(tmp_path / "trl_chat", tmp_path / "trl_pref.parquet"),
                                  (tmp_path / "conv_string.parquet", tmp_path / "rlaif_v.parquet")]:
        got = rows(mimic_data, pref_data, f"d_{mimic_data.stem}")
        same(got["mimic"], want["mimic"])
        same(got["pref"], want["pref"])
    assert [r["sample_id"] for r in got["pref"]] == [f"rlaif_v.parquet:{i}" for i in range(6)]
    # Inline images are kept in the dump (content-addressed): the student reads what the teacher saw
    # with no --image-root, and `shards verify` checks the store.
    import numpy as np

    from shared.image_store import store_path
    from shared.shards import verify_dump
    from student_train.data import iter_examples

    trl = tmp_path / "d_trl_chat"
    for kind, records in (("mimic", mimic), ("pref", pref)):
        examples = list(iter_examples(shard_paths(trl, kind), kind, None))
        assert [np.asarray(e.images[0]).tolist() for e in examples] == [np.asarray(pil[r["image"]]).tolist()
                                                                    for r in records]
    assert verify_dump(trl) == []
    sha = got["pref"][0]["image_sha256"][0]
    store_path(tmp_path / "d_conv_string", sha).write_bytes(b"not the image")
    assert any("bytes differ from their sha256 name" in p for p in verify_dump(tmp_path / "d_conv_string"))
    from student_train.data import ShardError

    with pytest.raises(ShardError, match="copy of its inline image .* is damaged; rerun `lmod dump-teacher`"):
        list(iter_examples(shard_paths(tmp_path / "d_conv_string", "pref"), "pref", None))
    store_path(tmp_path / "d_conv_string", sha).unlink()
    assert any(f"{sha}: missing" in p for p in verify_dump(tmp_path / "d_conv_string"))
    # A rerun of the same dump restores the store (it said "already finished" and the student was
    # told to rerun the dump: a loop), damaged copies included.
    store_path(tmp_path / "d_conv_string", got["pref"][1]["image_sha256"][0]).write_bytes(b"damaged")
    before = {p.name: p.read_bytes() for p in shard_paths(tmp_path / "d_conv_string", "pref")}
    rows(tmp_path / "conv_string.parquet", tmp_path / "rlaif_v.parquet", "d_conv_string")
    assert verify_dump(tmp_path / "d_conv_string") == []
    assert {p.name: p.read_bytes() for p in shard_paths(tmp_path / "d_conv_string", "pref")} == before


def test_a_rerun_after_an_image_changed_in_place_redoes_the_shards_that_used_it(world, teacher, tmp_path):
    """The rerun kept the old shards and reported complete; training refused later."""
    from PIL import Image

    from shared.shards import shard_paths

    w = _copy_world(world, tmp_path)
    out = tmp_path / "out"
    res = _cli(*_dump_args(w, teacher, out))
    assert res.exit_code == 0, res.output
    first = json.loads((w / "mimic.jsonl").read_text().splitlines()[0])
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    Image.new("RGB", (64, 64), (1, 2, 3)).save(w / first["image"])  # the same name, other pixels
    res = _cli(*_dump_args(w, teacher, out))
    assert res.exit_code == 0, res.output
    assert "1 finished shards used images that changed since" in res.output and "1 to run" in res.output
    redone = {p for p in out.rglob("*.parquet") if p.stat().st_mtime_ns != mtimes[p]}
    assert redone == {shard_paths(out, "mimic")[0]}
    import hashlib

    import pyarrow.parquet as pq

    row = pq.read_table(redone.pop()).to_pylist()[0]
    assert row["image_sha256"] == [hashlib.sha256((w / first["image"]).read_bytes()).hexdigest()]



@pytest.mark.fast
@pytest.mark.parametrize("unused", [None, []])
def test_an_image_beside_an_empty_images_column_keeps_its_image(world, unused, tmp_path):
    """A Parquet union of LLaVA rows (`image`) and TRL rows (`images`) gives every row both columns:
    a LLaVA row's `images` is null or empty. The row lost its image and was dumped as text-only."""
    from teacher_dump.inputs import check_row

    rec = json.loads((world / "mimic.jsonl").read_text().splitlines()[0])
    assert isinstance(rec["image"], str)
    got = check_row(world / "mimic.jsonl", "mimic", 0, {**rec, "images": unused}, None, world)
    assert [i.ref for i in got.images] == [rec["image"]]
    trl = check_row(world / "mimic.jsonl", "mimic", 0, {**rec, "image": None, "images": [rec["image"]]}, None, world)
    assert [i.ref for i in trl.images] == [rec["image"]]
    both = check_row(world / "mimic.jsonl", "mimic", 0, {**rec, "images": [rec["image"]]}, None, world)
    assert "both 'image' and 'images' given" in both.reason


def test_a_dump_prints_its_own_lines_and_keeps_the_engines_output_in_a_log(world, teacher, tmp_path):
    """Every dump printed Ray's token-auth notice and its start-up line, and the engines' warnings
    (vLLM's ~23 lines) on the user's terminal. They go to OUT/logs/ now (--verbose shows them)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", *_dump_args(world, teacher, out)],
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stderr.replace("\r", "\n").splitlines() if line.strip()]
    bars = ("validating inputs:", "teacher:")
    assert [line for line in lines if not line.startswith(("lmod: ", *bars))] == []
    assert "Token authentication" not in res.stderr and "Started a local Ray instance" not in res.stderr
    assert list((out / "logs").glob("teacher-worker-*.log"))
