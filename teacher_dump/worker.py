"""A shard of input rows -> teacher rows of the shared schema. Two thin Ray actors use it:
`InputValidator` reads, checks, encodes and length-checks a shard's rows before any teacher starts
(`ShardCheck`), and `TeacherWorker` builds its backend once and then writes one shard per call,
scoring its records a chunk at a time (its memory does not grow with the shard)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from shared import image_store
from shared.codec import Encoding
from shared.images import ImageError, decode_rgb
from shared.manifest import ShardEntry
from shared.mllm import ImageFeatures, ModelInputs, SampleEncoder
from shared.prompt import TemplateError, llava_messages, pref_messages
from teacher_dump.backends import ExpansionMismatch, ScoreRequest, ScoreResult, TeacherBackend
from teacher_dump.inputs import (
    ImageRef,
    InputError,
    InputSlice,
    Record,
    Rejection,
    check_row,
    format_rejection,
    iter_slice,
)
from teacher_dump.shard_writer import ShardWriter

# Records per backend call. vLLM gets many (it schedules them itself; pixel tensors are dropped),
# transformers one batch's worth (it needs each image's tensors, held until the chunk is scored).
CHUNK_RECORDS = {"vllm": 256, "hf": 32}


@dataclass
class ShardTask:
    kind: str
    index: int
    rel_path: str
    rows: InputSlice  # the input rows [lo, hi) this shard covers
    image_root: str | None = None
    skip_rows: frozenset[int] = frozenset()  # rows refused when the inputs were validated (--skip-invalid)
    max_images: int = 1  # images one sample may have (--max-images: the engine is sized for it)


@dataclass
class ShardCheck:
    """What validating one shard's rows found: counts for the plan, every refusal, and a 64-bit hash
    of each valid record's id (the driver finds ids repeated across shards from them)."""

    kind: str
    index: int
    records: int
    tokens: int  # teacher positions: every token of every sequence, image tokens included
    longest: int
    rejected: list[Rejection]
    id_hashes: np.ndarray  # uint64, one per valid record
    id_rows: np.ndarray  # int64, their input rows


def id_hash(sample_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(sample_id.encode(), digest_size=8).digest(), "little")


@dataclass
class Encoded:
    """A valid record ready to score: its images (decoded, and the digests of their bytes) and its
    sequences (mimic: one; pref: chosen and rejected)."""

    record: Record
    images: list[Image.Image]
    image_sha256: list[str]
    sequences: list[ModelInputs]


class ImageCache:
    """The last few distinct images a worker decoded and processed, by the sha256 of their bytes:
    data sets ask many questions of one image (LLaVA's conversations of a COCO picture, a
    preference pair's variants), often in neighbouring rows. A hit costs a read and a hash."""

    def __init__(self, size: int = 8):
        self.size = size
        self.items: OrderedDict[str, tuple[Image.Image, ImageFeatures | None]] = OrderedDict()

    def get(self, digest: str) -> tuple[Image.Image, ImageFeatures | None] | None:
        if digest in self.items:
            self.items.move_to_end(digest)
        return self.items.get(digest)

    def put(self, digest: str, value: tuple[Image.Image, ImageFeatures | None]) -> None:
        self.items[digest] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)


def prepare(encoder: SampleEncoder, rec: Record, keep_tensors: bool = True,
            cache: ImageCache | None = None, count_only: bool = False) -> Encoded:
    """Decode the images and encode the record; ValueError (with the reason) if it cannot be.
    `keep_tensors=False` drops the processor's pixel tensors once the token run is known (vLLM
    processes the image itself; a chunk of SmolVLM images is gigabytes of them). `count_only`
    (validation): each image's token run by length only, without pixel tensors where the
    processor can count (SampleEncoder.counted_image)."""
    pils, digests, features = [], [], []
    for image in rec.images:
        data = image_bytes(image)
        digest = hashlib.sha256(data).hexdigest()
        hit = cache.get(digest) if cache is not None else None
        if hit is None:
            try:
                pil = decode_rgb(data)
            except ImageError as e:
                raise ValueError(f"image {image.ref or '<bytes>'} {e}") from None
            feature = encoder.counted_image(pil) if count_only else encoder.image_features(pil)
            if feature is not None and not keep_tensors:
                feature = ImageFeatures(feature.ids, {})
            hit = (pil, feature)
            if cache is not None:
                cache.put(digest, hit)
        pils.append(hit[0])
        digests.append(digest)
        features.append(hit[1])
    return Encoded(rec, pils, digests, encode_record(encoder, rec, features))


def valid_records(encoder: SampleEncoder, task: ShardTask, max_model_len: int, keep_tensors: bool = True,
                  cache: ImageCache | None = None, count_only: bool = False) -> Iterator[Encoded | Rejection]:
    """The shard's rows in order, each encoded or with the reason it is invalid: fields, image
    (header and pixels), the record against the chat template, the length. Rows in
    `task.skip_rows` are passed over."""
    for row, raw, err in iter_slice(task.rows):
        if row in task.skip_rows:
            continue
        rec = check_row(Path(task.rows.path), task.kind, row, raw, err, task.image_root)
        if isinstance(rec, Rejection):
            yield rec
            continue
        if len(rec.images) > task.max_images:
            yield Rejection(task.rows.path, row, rec.sample_id, f"{len(rec.images)} images > --max-images "
                            f"{task.max_images}; raise --max-images to dump it")
            continue
        try:
            item = prepare(encoder, rec, keep_tensors, cache, count_only)
        except TemplateError:
            raise  # the model's template, not this record: no point in going on
        except ValueError as e:
            yield Rejection(task.rows.path, row, rec.sample_id, str(e))
            continue
        longest = max(len(e.ids) for e in item.sequences)
        if longest > max_model_len:
            yield Rejection(task.rows.path, row, rec.sample_id, f"{longest} tokens > --max-model-len {max_model_len}")
        else:
            yield item


def check_shard(encoder: SampleEncoder, task: ShardTask, max_model_len: int,
                cache: ImageCache | None = None, count_only: bool = True,
                progress: Callable[[int], None] | None = None) -> ShardCheck:
    """Validate one shard's rows (lengths and refusals; `count_only`: image token runs counted, not
    made, where the processor can count them). `progress(n)` is told of every 16 rows checked."""
    rejected: list[Rejection] = []
    hashes: list[int] = []
    rows: list[int] = []
    tokens = longest = seen = 0
    for item in valid_records(encoder, task, max_model_len, keep_tensors=False, cache=cache, count_only=count_only):
        seen += 1
        if progress is not None and seen % 16 == 0:
            progress(16)
        if isinstance(item, Rejection):
            rejected.append(item)
            continue
        hashes.append(id_hash(item.record.sample_id))
        rows.append(item.record.input_row)
        tokens += sum(len(e.ids) for e in item.sequences)
        longest = max([longest, *(len(e.ids) for e in item.sequences)])
    if progress is not None and seen % 16:
        progress(seen % 16)
    return ShardCheck(task.kind, task.index, len(rows), tokens, longest, rejected,
                      np.array(hashes, dtype=np.uint64), np.array(rows, dtype=np.int64))


class InputValidator:
    """A Ray actor per CPU: holds the teacher's processor (no weights) and checks shards."""

    def __init__(self, model_dir: str, max_model_len: int):
        from shared.mllm import load_encoder

        self.encoder = load_encoder(model_dir)
        self.max_model_len = max_model_len
        self.cache = ImageCache()

    def check(self, task: ShardTask, progress: Any = None) -> ShardCheck:
        """`progress`: a Ray queue told how many rows were checked, as they are."""
        tell = progress.put_nowait if progress is not None else None
        return check_shard(self.encoder, task, self.max_model_len, self.cache, progress=tell)


_DONE = object()


def prefetched(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """`items`, produced up to `depth` ahead by a background thread (order kept; an exception in
    the producer is raised here, where the item would have been). Stopping early stops the
    producer at its next item."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            slots.put(e)

    thread = threading.Thread(target=produce, name="lmod-prefetch", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                slots.get_nowait()
            except queue.Empty:
                thread.join(0.05)


def image_bytes(image: ImageRef) -> bytes:
    """An image's bytes as stored (inline, or read from its path now); ValueError if it is gone."""
    if image.data is not None:
        return image.data
    try:
        return Path(image.path).read_bytes()
    except OSError as e:
        raise ValueError(f"image {image.ref} cannot be read ({e.strerror})") from e


def encode_record(encoder: SampleEncoder, rec: Record, images: list[ImageFeatures]) -> list[ModelInputs]:
    """Mimic: one sequence; pref: the chosen and the rejected sequence (images processed once)."""
    if rec.kind == "mimic":
        messages = llava_messages(rec.fields["conversations"], len(images))
        return [encoder.encode(messages, images, responses=sampled_answer(encoder, rec.fields, messages))]
    q = rec.fields["question"]
    return [encoder.encode(pref_messages(q, rec.fields[key], len(images)), images) for key in ("chosen", "rejected")]


def sampled_answer(encoder: SampleEncoder, fields: dict[str, Any], messages: Any) -> list[list[int]] | None:
    """The response ids to score for a record `lmod generate` wrote: the earlier answers as the
    template renders them and, for the last one, exactly the ids the model sampled, when they are
    ids of this tokenizer's vocabulary (on-policy rounds: the teacher scores the student's tokens).
    None otherwise: the answers' text is encoded as usual."""
    generation = fields.get("generation")
    sampled = generation.get("response_ids") if isinstance(generation, dict) else None
    if not isinstance(sampled, list) or generation.get("vocab_sha256") != encoder.vocab_sha256:
        return None
    if not sampled or not all(isinstance(t, int) and 0 <= t < len(encoder.tokenizer) for t in sampled):
        raise ValueError("generation.response_ids: not ids of this tokenizer; drop the 'generation' entry to "
                         "score the answer's text")
    return [*encoder.response_ids(messages)[:-1], sampled]


def score_request(enc: ModelInputs, images: list[Image.Image], top_k: int, sample: int = 0,
                  sample_seed: int = 0, counted_id: int | None = None) -> ScoreRequest:
    positions = [i for i, m in enumerate(enc.response_mask) if m]
    return ScoreRequest(ids=enc.ids, prompt_ids=enc.prompt_ids, positions=positions, images=images,
                        features=enc.images, top_k=top_k, sample=sample, sample_seed=sample_seed,
                        counted_id=counted_id)


def record_seed(seed: int, sample_id: str) -> int:
    """A record's own sampling seed, from the run's seed and the record's id (not its position)."""
    return int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:15], 16)


def rest_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """Probability outside the top-k, in float64 before rounding, never below 0."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)
    return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


def shard_rows(
    backend: TeacherBackend, encoder: SampleEncoder, items: list[Encoded], top_k: int,
    encoding: Encoding = Encoding("f32"), sample: int = 0, sample_seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Score encoded records in one backend call; returns (rows in `encoding`, response tokens)."""
    return rows_of(encoder, items, score_items(backend, encoder, items, top_k, sample, sample_seed), encoding)


def score_items(backend: TeacherBackend, encoder: SampleEncoder, items: list[Encoded], top_k: int, sample: int = 0,
                sample_seed: int = 0) -> list[ScoreResult]:
    """One backend call for encoded records: a result per sequence, in order. Under vLLM, whose
    processor expands the images itself, a record's image runs may have been counted by the
    processor's size helper (trusted once it agreed with the full processor on the first images):
    should vLLM's expansion differ on a later image, the chunk's images go through the full processor
    (items are replaced in place), the helper is no longer trusted, and the chunk is scored again;
    only a difference that remains stops the dump."""
    # vLLM expands the images itself; ours may be counted runs (placeholder ids of the right length)
    counted_id = encoder.image_token_id if backend.name != "hf" else None

    def requests_of(chunk: list[Encoded]) -> list[ScoreRequest]:
        requests = []
        for item in chunk:
            rec, images = item.record, item.images
            k = top_k if rec.kind == "mimic" else 0  # preference rows need the targets' log-probs only
            n = sample if rec.kind == "mimic" else 0
            seed = record_seed(sample_seed, rec.sample_id) if n else 0
            requests.extend(score_request(e, images, k, n, seed, counted_id) for e in item.sequences)
        return requests

    requests = requests_of(items)
    if not requests:
        return []
    try:
        return backend.score(requests)
    except ExpansionMismatch:
        if counted_id is None:
            raise
        encoder.distrust_count_helper()
        for i, item in enumerate(items):
            if item.images:
                items[i] = prepare(encoder, item.record, keep_tensors=False)
        return backend.score(requests_of(items))


def rows_of(encoder: SampleEncoder, items: list[Encoded], results: list[ScoreResult],
            encoding: Encoding = Encoding("f32")) -> tuple[list[dict[str, Any]], int]:
    """Rows of the shared schema (in `encoding`) from records and their scores; (rows, response tokens)."""
    rows: list[dict[str, Any]] = []
    tokens = 0
    it = iter(results)
    for item in items:
        rec, encs, digests = item.record, item.sequences, item.image_sha256
        # An inline image (bytes in the input) has no path to name: it is in the dump's image store
        # under its digest, and its `image` entry stays empty.
        common = {"sample_id": rec.sample_id, "input_row": rec.input_row,
                  "image": [i.ref if i.data is None else None for i in rec.images], "image_sha256": digests}
        if rec.kind == "mimic":
            (enc,) = encs
            res = next(it)
            response_ids = [t for t, m in zip(enc.ids, enc.response_mask) if m]
            tokens += len(response_ids)
            topk_ids, topk_logprobs = encoding.encode_topk(res.topk_ids, res.topk_logprobs)
            rows.append({
                **common,
                "teacher_prompt": enc.text,
                "conversations_json": json.dumps(rec.fields["conversations"], ensure_ascii=False),
                "response_ids": response_ids,
                "response_turn_lengths": enc.turn_lengths,
                "target_logprobs": encoding.encode_targets(res.target_logprobs),
                "topk_ids": topk_ids,
                "topk_logprobs": topk_logprobs,
                "rest_mass": rest_mass(res.topk_logprobs),  # from the unquantised log-probs
                "sampled_ids": res.sampled_ids,
                "sampled_counts": res.sampled_counts,
            })
        else:
            chosen, rejected = encs
            res_c, res_r = next(it), next(it)
            c_ids = [t for t, m in zip(chosen.ids, chosen.response_mask) if m]
            r_ids = [t for t, m in zip(rejected.ids, rejected.response_mask) if m]
            tokens += len(c_ids) + len(r_ids)
            prompt_text = encoder.render(pref_messages(rec.fields["question"], None, len(digests)), True)
            rows.append({
                **common,
                "teacher_prompt": prompt_text,
                "question": rec.fields["question"],
                "chosen": rec.fields["chosen"],
                "rejected": rec.fields["rejected"],
                "chosen_ids": c_ids,
                "rejected_ids": r_ids,
                "chosen_logprobs": res_c.target_logprobs,
                "rejected_logprobs": res_r.target_logprobs,
                "chosen_logprob_sum": float(res_c.target_logprobs.astype(np.float64).sum()),
                "rejected_logprob_sum": float(res_r.target_logprobs.astype(np.float64).sum()),
            })
    return rows, tokens


LOGS_DIR = "logs"
WORKER_LOG_ENV = "LMOD_WORKER_LOG"  # set by the driver: this process's output goes to a file there


def _output_to_log() -> None:
    """Send this process's stdout and stderr (file descriptors: C++ and engine output included) to
    DIR/teacher-worker-HOST-PID.log when the driver asked for it."""
    import socket

    log_dir = os.environ.get(WORKER_LOG_ENV)
    if not log_dir:
        return
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    log = open(Path(log_dir) / f"teacher-worker-{socket.gethostname()}-{os.getpid()}.log", "a", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)


class TeacherWorker:
    """Holds one engine for its whole life; one call = one shard written under `out_dir`."""

    def __init__(self, model_dir: str, backend: str, engine: dict[str, Any], top_k: int, out_dir: str,
                 encoding: str = "f32", sample: int = 0, sample_seed: int = 0):
        _output_to_log()
        from shared.mllm import load_encoder
        from teacher_dump.backends import make_backend

        self.encoder = load_encoder(model_dir)
        self.backend = make_backend(backend, model_dir, **engine)
        self.top_k = top_k
        self.encoding = Encoding(encoding)
        self.sample, self.sample_seed = sample, sample_seed
        self.out_dir = Path(out_dir)
        self.chunk_records = CHUNK_RECORDS[backend]
        self.cache = ImageCache()
        # The pipeline (see run_shard) pays when the engine has its own device. A CPU teacher's
        # host work competes with the engine for the same cores: there it was slower (bench_dump.py).
        self.pipelined = torch.cuda.is_available()

    def run_shard(self, task: ShardTask, max_model_len: int, progress: Any = None) -> tuple[str, ShardEntry]:
        """Dump one shard; `progress` (a Ray queue, optional) is told each chunk's record count as it
        is scored, for the driver's per-record bar."""
        # Pipelined, three stages in order: the next chunk is read, decoded and encoded on the
        # host (a thread) while the engine scores this one on its GPU, and the previous chunk's
        # rows are built and written (another thread). Host work thus leaves the engine's
        # critical path; at most three chunks are in memory. Else the same steps in turn.
        with ShardWriter(self.out_dir, task.rel_path, task.kind, task.index, [task.rows.lo, task.rows.hi],
                         self.encoding) as writer, ThreadPoolExecutor(1, thread_name_prefix="lmod-rows") as post:
            pending: Future | None = None
            chunks = self._chunks(task, max_model_len)
            for chunk in prefetched(chunks) if self.pipelined else chunks:
                self._store_images(chunk)
                results = score_items(self.backend, self.encoder, chunk, self.top_k, self.sample, self.sample_seed)
                if progress is not None:
                    progress.put_nowait(len(chunk))
                if pending is not None:
                    pending.result()  # raises what the previous chunk's writing raised
                job = partial(self._write, writer, chunk, results)
                pending = post.submit(job) if self.pipelined else job()
            if pending is not None:
                pending.result()
        return task.rel_path, writer.entry

    def _write(self, writer: ShardWriter, chunk: list[Encoded], results: list[ScoreResult]) -> None:
        writer.write(*rows_of(self.encoder, chunk, results, self.encoding))

    def _chunks(self, task: ShardTask, max_model_len: int) -> Iterator[list[Encoded]]:
        chunk: list[Encoded] = []
        # vLLM processes the images itself: the worker needs their runs' lengths only (counted
        # where the processor can count; vLLM's own expansion is checked against them).
        counted = self.backend.name != "hf"
        for item in valid_records(self.encoder, task, max_model_len, keep_tensors=not counted, cache=self.cache,
                                  count_only=counted):
            if isinstance(item, Rejection):  # validated before the teachers started: the input changed since
                raise InputError(f"{format_rejection(item)}; the input changed after it was validated; "
                                 "rerun the dump")
            chunk.append(item)
            if len(chunk) == self.chunk_records:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _store_images(self, chunk: list[Encoded]) -> None:
        for item in chunk:  # inline images: kept in the dump for the student (shared/image_store.py)
            for image, digest in zip(item.record.images, item.image_sha256, strict=True):
                if image.data is not None:
                    image_store.put(self.out_dir, image.data, digest)
