"""Shards -> student batches, streamed.

Nothing is held per row: a `ShardIndex` keeps one entry per Parquet row group, `BatchOrder` says
which global rows make micro-batch i (a pure function of the seed, so resume and DDP are exact),
and `MicroBatches` reads, checks, decodes, encodes and collates one rank's part of a micro-batch;
torch `DataLoader` workers run it. The student builds prompts with its own processor and takes the
stored response ids as labels (or, for a student with another tokenizer, its own tokenisation of the
answers with the teacher rows restated by student_train/cross_tokenizer.py).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from shared import image_store
from shared.codec import Encoding, read_row_group
from shared.fingerprint import tokenizer_fingerprint, vocabulary_facts, vocabulary_mismatch
from shared.images import ImageError, decode_rgb
from shared.mllm import ModelInputs, SampleEncoder, batch_inputs, load_encoder
from shared.prompt import Messages, llava_messages, pref_messages
from shared.schema import SAMPLED_COLUMNS, row_images, schema_for

if TYPE_CHECKING:
    from student_train.cross_tokenizer import TokenBridge
from shared.shards import shard_file_problem, shard_paths
from student_train.dumps import Dumps, ShardError

__all__ = ["ShardError"]  # raised here, defined beside Dumps


# ----------------------------------------------------------------------------------------------
# Which shards, and are they the ones the teacher wrote


def check_shards(dumps: Dumps | Sequence[Path], kind: str, encoder: SampleEncoder, allow_partial: bool = False,
                 verify: bool = True, sampled: bool = False, cross: bool = False) -> list[Path]:
    """Shard files of `kind` from every dir, after checking that each dir's stored ids mean the
    same to the student's tokenizer (tokenizers are compared, not embedding shapes; `cross`: they
    need not, the ids are restated by a TokenBridge), that the dump
    is complete (unless `allow_partial`) and that every file's bytes match the manifest's sha256 (a
    flipped byte in a float column reads fine and trains a NaN student). Files are hashed once here,
    streamed, a few at a time; readers later trust them."""
    dumps = Dumps.open(dumps)
    mine = vocabulary_facts(encoder.tokenizer)
    files: list[Path] = []
    inputs: dict[str, Path] = {}
    for d, manifest in ((dump.dir, dump.manifest) for dump in dumps):
        run = manifest.record
        digest = run.input_sha256(kind)
        if digest in inputs:
            raise ShardError(f"{d} and {inputs[digest]} were dumped from the same {kind} data (sha256 {digest[:12]}); "
                             "its rows would be trained twice: pass one of them")
        if digest:
            inputs[digest] = Path(d)
        if cross:
            problem = None
        elif run.vocabulary is not None:
            problem = vocabulary_mismatch(run.vocabulary, mine)
        elif run.tokenizer_sha256 != tokenizer_fingerprint(encoder.tokenizer):  # older dumps
            problem = "shards were made with another tokenizer"
        else:
            problem = None
        if problem:
            raise ShardError(f"{d}: {problem}")
        if sampled and not run.sample:
            raise ShardError(f"{d}: dumped without --sample, so it holds no teacher draws for kd: sampled; "
                             "use kd: topk, or dump again with --sample N")
        planned = run.planned_shards(kind)
        done = sum(e.kind == kind for e in manifest.shards.values())
        if done < planned and not allow_partial:
            raise ShardError(f"{d}: only {done} of {planned} {kind} shards are finished; rerun `lmod dump-teacher` "
                             "to finish the dump, or pass --allow-partial to train on what is there")
        paths = shard_paths(d, kind, manifest)
        if verify:
            entries = [manifest.shards[f"{kind}/{p.name}"] for p in paths]
            with ThreadPoolExecutor(4) as pool:  # hashlib releases the GIL
                for path, problem in zip(paths, pool.map(shard_file_problem, paths, entries), strict=True):
                    if problem:
                        raise ShardError(f"{path}: {problem}; `lmod shards verify {d}` lists the bad shards, "
                                         "rerun `lmod dump-teacher` to redo them")
            expected = schema_for(kind, Encoding.of_run(manifest.run), manifest.format_version)
            for path in paths:  # footers only: a hand-made shard with a column missing or renamed
                got = pq.read_schema(path).remove_metadata()
                if not got.equals(expected.remove_metadata()):
                    missing = sorted(set(expected.names) - set(got.names))
                    what = f"no column {missing[0]!r}" if missing else "columns of other types or names"
                    raise ShardError(f"{path}: not the {kind} shard schema ({what}); rerun `lmod dump-teacher` "
                                     "to redo it")
        files.extend(paths)
    if not files:
        raise ShardError(f"no {kind} shards in {', '.join(map(str, dumps.dirs))}; run `lmod dump-teacher` first")
    if len(dumps) > 1:
        _warn_shared_ids(files)
    return files


def _warn_shared_ids(files: list[Path]) -> None:
    """Dumps of different data that share sample ids (a subset dumped again, a renamed copy): said
    once on stderr with the count and an example; their rows are trained as given."""
    import sys

    owner: dict[str, Path] = {}
    shared: list[tuple[str, Path, Path]] = []
    for path in files:
        for sid in pq.read_table(path, columns=["sample_id"]).column(0).to_pylist():
            first = owner.setdefault(sid, path)
            if first.parent.parent != path.parent.parent:
                shared.append((sid, first, path))
    if shared:
        sid, a, b = shared[0]
        print(f"lmod: warning: {len(shared)} sample ids appear in more than one dump (e.g. {sid!r} in {a} and {b}); "
              "those rows are trained once per dump", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# Where each row is, and in which order rows are visited


@dataclass(frozen=True)
class RowGroup:
    path: str
    group: int  # Parquet row group within the file
    rows: int
    first_row: int  # its first row's number within the file (for error messages)


class ShardIndex:
    """Every row of some shard files, addressed by a global row number. Holds one entry per
    Parquet row group (file footers only), never per row."""

    def __init__(self, files: Sequence[Path]):
        self.groups: list[RowGroup] = []
        for f in files:
            try:
                meta = pq.ParquetFile(f).metadata
            except (OSError, pa.ArrowException) as e:
                raise ShardError(f"{f}: unreadable Parquet ({e}); rerun `lmod dump-teacher` to redo it") from None
            first = 0
            for g in range(meta.num_row_groups):
                self.groups.append(RowGroup(str(f), g, meta.row_group(g).num_rows, first))
                first += meta.row_group(g).num_rows
        self.starts = [0]
        for g in self.groups:
            self.starts.append(self.starts[-1] + g.rows)

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def locate(self, row: int) -> tuple[int, int]:
        """(row group number, row within it) of a global row."""
        g = bisect.bisect_right(self.starts, row) - 1
        return g, row - self.starts[g]


class BatchOrder:
    """Which global rows make global micro-batch `step`: every epoch visits the row groups in a
    seeded random order and shuffles rows within windows of `window` consecutive row groups, so a
    reader needs a window's row groups at a time, not the data set. A pure function of (row-group
    sizes, seed, window, step): a resumed run and every DDP rank compute the same batches.
    `shuffle=False` visits rows in storage order (evaluation)."""

    def __init__(self, group_rows: Sequence[int], seed: int = 0, window: int = 8, shuffle: bool = True):
        self.group_rows = list(group_rows)
        self.starts = [0]
        for n in self.group_rows:
            self.starts.append(self.starts[-1] + n)
        if self.starts[-1] == 0:
            raise ShardError("the shards hold no rows")
        self.seed, self.window, self.shuffle = seed, window, shuffle
        self._layout = lru_cache(maxsize=2)(self._epoch_layout)
        self._rows_of = lru_cache(maxsize=4)(self._window_rows)

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def batch(self, step: int, batch_size: int) -> list[int]:
        start, out = step * batch_size, []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), self.rows)
            window_starts = self._layout(epoch)[1]
            w = bisect.bisect_right(window_starts, offset) - 1
            rows = self._rows_of(epoch, w)
            lo = offset - window_starts[w]
            out.extend(rows[lo : lo + batch_size - len(out)])
        return out

    def _epoch_layout(self, epoch: int) -> tuple[list[int], list[int]]:
        order = list(range(len(self.group_rows)))
        if self.shuffle:
            random.Random(f"groups:{self.seed}:{epoch}").shuffle(order)
        window_starts = [0]
        for w in range(0, len(order), self.window):
            window_starts.append(window_starts[-1] + sum(self.group_rows[g] for g in order[w : w + self.window]))
        return order, window_starts

    def _window_rows(self, epoch: int, w: int) -> list[int]:
        order = self._layout(epoch)[0]
        rows = [r for g in order[w * self.window : (w + 1) * self.window]
                for r in range(self.starts[g], self.starts[g + 1])]
        if self.shuffle:
            random.Random(f"rows:{self.seed}:{epoch}:{w}").shuffle(rows)
        return rows


# ----------------------------------------------------------------------------------------------
# Rows -> examples


@dataclass
class MimicExample:
    messages: Messages  # rendered by the student's own template
    responses: list[list[int]]  # the teacher's response ids per assistant turn (the labels)
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    rest_mass: list[float]
    images: list[Image.Image]  # in the order of their placeholders
    sampled_ids: list[list[int]] | None = None  # RS-KD draws (unique ids, counts) when read
    sampled_counts: list[list[int]] | None = None
    kd_mask: list[bool] | None = None  # cross-tokenizer rows: positions paired with a teacher row


@dataclass
class PrefExample:
    chosen: Messages
    rejected: Messages
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float
    ref_rejected: float
    images: list[Image.Image]


_COLUMNS = {
    "mimic": ["sample_id", "image", "image_sha256", "conversations_json", "response_ids", "response_turn_lengths",
              "topk_ids", "topk_logprobs", "rest_mass"],
    "pref": ["sample_id", "image", "image_sha256", "question", "chosen", "rejected", "chosen_ids", "rejected_ids",
             "chosen_logprob_sum", "rejected_logprob_sum"],
}


def _images(row: dict, image_root: Path | None, where: str, dump_dir: Path) -> list[Image.Image]:
    """The images the teacher saw for this row, each checked against the digest it stored."""
    return [_image(ref, sha, image_root, where, dump_dir) for ref, sha in row_images(row["image"], row["image_sha256"])]


def _image(ref: str | None, sha: str, image_root: Path | None, where: str, dump_dir: Path) -> Image.Image:
    """One image: from the dump's image store when it came inline, else its path under `image_root`."""
    path = image_store.store_path(dump_dir, sha)
    if not path.is_file():
        if not ref:
            raise ShardError(f"{where}: its inline image is missing from the dump's image store ({path}); run "
                             f"`lmod shards verify {dump_dir}` and rerun the dump")
        path = Path(ref) if image_root is None else image_root / ref
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{where}: cannot read image {path} ({e.strerror}); check --image-root") from None
    if hashlib.sha256(data).hexdigest() != sha:
        if path == image_store.store_path(dump_dir, sha):
            raise ShardError(f"{where}: the dump's copy of its inline image ({path}) is damaged; rerun `lmod "
                             "dump-teacher` with the same command to restore it")
        raise ShardError(f"{where}: {path} is not the image the teacher saw (sha256 differs); point --image-root "
                         "at the images of the dump")
    try:
        return decode_rgb(data)
    except ImageError as e:
        raise ShardError(f"{where}: {path} {e}") from None


def mimic_example(row: dict, image_root: Path | None, where: str, dump_dir: Path,
                  with_image: bool = True) -> MimicExample:
    responses, start = [], 0
    for n in row["response_turn_lengths"]:
        responses.append(row["response_ids"][start : start + n])
        start += n
    n_images = len(row_images(row["image"], row["image_sha256"]))
    messages = llava_messages(json.loads(row["conversations_json"]), n_images)
    return MimicExample(messages, responses, row["topk_ids"], row["topk_logprobs"], row["rest_mass"],
                        _images(row, image_root, where, dump_dir) if with_image else [], row.get("sampled_ids"),
                        row.get("sampled_counts"))


def pref_example(row: dict, image_root: Path | None, where: str, dump_dir: Path) -> PrefExample:
    n_images = len(row_images(row["image"], row["image_sha256"]))
    return PrefExample(pref_messages(row["question"], row["chosen"], n_images),
                       pref_messages(row["question"], row["rejected"], n_images),
                       row["chosen_ids"], row["rejected_ids"], row["chosen_logprob_sum"], row["rejected_logprob_sum"],
                       _images(row, image_root, where, dump_dir))


_EXAMPLE = {"mimic": mimic_example, "pref": pref_example}


def columns(kind: str, sampled: bool = False) -> list[str]:
    """The shard columns a student reads (RS-KD's draws only when training on them)."""
    return _COLUMNS[kind] + (list(SAMPLED_COLUMNS) if sampled and kind == "mimic" else [])


def iter_examples(files: Sequence[Path], kind: str, image_root: Path | None, sampled: bool = False,
                  with_image: bool = True):
    """Every example of some (checked) shard files in storage order, one row group in memory at a time
    (`with_image=False`: mimic rows without reading their images)."""
    for f in files:
        pf = pq.ParquetFile(f)
        row = 0
        for g in range(pf.metadata.num_row_groups):
            for r in read_row_group(pf, g, columns(kind, sampled)).to_pylist():
                where = f"{f} row {row} (id {r['sample_id']})"
                if with_image:
                    yield _EXAMPLE[kind](r, image_root, where, Path(f).parent.parent)
                else:
                    yield mimic_example(r, image_root, where, Path(f).parent.parent, with_image=False)
                row += 1


def load_mimic(files: Sequence[Path], image_root: Path | None) -> list[MimicExample]:
    """All mimic examples in memory: for tests and small held-out sets; training streams."""
    return list(iter_examples(files, "mimic", image_root))


def load_pref(files: Sequence[Path], image_root: Path | None) -> list[PrefExample]:
    return list(iter_examples(files, "pref", image_root))


# ----------------------------------------------------------------------------------------------
# Examples -> model inputs


def label_positions(enc: ModelInputs) -> list[int]:
    """Positions p whose token is a label (predicted from the logits at p - 1)."""
    return [p for p, m in enumerate(enc.response_mask) if m]


def encode_mimic(encoder: SampleEncoder, ex: MimicExample) -> ModelInputs:
    """The student's own prompt around the teacher's stored response ids."""
    return encoder.encode(ex.messages, [encoder.image_features(im) for im in ex.images], responses=ex.responses)


def encode_pref(encoder: SampleEncoder, ex: PrefExample, own_tokens: bool = False) -> tuple[ModelInputs, ModelInputs]:
    """Chosen and rejected conversations around the teacher's answer ids, or (`own_tokens`, a
    student with another tokenizer) the student's own tokenisation of the same answers."""
    images = [encoder.image_features(im) for im in ex.images]  # processed once for both answers
    if own_tokens:
        return encoder.encode(ex.chosen, images), encoder.encode(ex.rejected, images)
    return (encoder.encode(ex.chosen, images, responses=[ex.chosen_ids]),
            encoder.encode(ex.rejected, images, responses=[ex.rejected_ids]))


@dataclass
class MimicBatch:
    """One forward's worth of mimic examples. Label n sits at (rows[n], cols[n] + 1) of input_ids
    and is predicted by the logits at (rows[n], cols[n])."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor  # [N] long
    cols: torch.Tensor  # [N] long
    topk_ids: torch.Tensor  # [N, k] long
    topk_logprobs: torch.Tensor  # [N, k] float32
    rest_mass: torch.Tensor  # [N] float32, as the teacher stored it
    sampled_ids: torch.Tensor | None = None  # [N, m] long: RS-KD draws' unique ids (padding: id 0)
    sampled_weights: torch.Tensor | None = None  # [N, m] float32: count / draws (padding: 0)
    kd_mask: torch.Tensor | None = None  # [N] bool: a teacher row to learn from (cross-tokenizer; None: all)

    @property
    def tokens(self) -> int:
        return int(self.rows.numel())

    def to(self, device: str | torch.device) -> MimicBatch:
        return _to(self, device)


@dataclass
class PrefBatch:
    """Chosen sequences first, then the rejected ones; label n belongs to sequence seq[n]."""

    inputs: dict[str, torch.Tensor]
    rows: torch.Tensor
    cols: torch.Tensor
    ref_chosen: torch.Tensor  # [B] float64: the teacher's (reference) summed log-probs
    ref_rejected: torch.Tensor
    chosen_tokens: int

    @property
    def pairs(self) -> int:
        return int(self.ref_chosen.numel())

    @property
    def tokens(self) -> int:
        return self.chosen_tokens

    def to(self, device: str | torch.device) -> PrefBatch:
        return _to(self, device)


def _to(batch, device):
    moved = {}
    for f in fields(batch):
        v = getattr(batch, f.name)
        if isinstance(v, torch.Tensor):
            v = v.to(device)
        elif isinstance(v, dict):
            v = {k: t.to(device) for k, t in v.items()}
        moved[f.name] = v
    return type(batch)(**moved)


def _label_index(encoded: Sequence[ModelInputs]) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = [], []
    for b, e in enumerate(encoded):
        positions = label_positions(e)
        rows.extend([b] * len(positions))
        cols.extend(p - 1 for p in positions)  # logits at p-1 predict the token at p
    return torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)


def _rows(examples: Sequence[MimicExample], attr: str, dtype: torch.dtype, pad: float | None = None) -> torch.Tensor:
    """Every response position's values, stacked. With `pad`, rows of top-k width below the widest
    (dumps of other --top-k trained together) are padded with it: ids with 0 and log-probs with
    -inf, entries that carry no mass (the losses' folded-duplicate case)."""
    values = [getattr(e, attr) for e in examples]
    if values and all(isinstance(v, np.ndarray) for v in values):  # restated by a TokenBridge
        if pad is not None and len({v.shape[1] for v in values}) > 1:
            width = max(v.shape[1] for v in values)
            values = [np.pad(v, ((0, 0), (0, width - v.shape[1])), constant_values=pad) for v in values]
        return torch.from_numpy(np.concatenate(values)).to(dtype)
    rows = [t for v in values for t in v]
    if pad is not None and len({len(t) for t in rows}) > 1:
        width = max(len(t) for t in rows)
        rows = [list(t) + [pad] * (width - len(t)) for t in rows]
    return torch.tensor(rows, dtype=dtype)


def _turns(enc: ModelInputs) -> list[list[int]]:
    """The response ids of each assistant turn of an encoded conversation."""
    labels = [t for t, m in zip(enc.ids, enc.response_mask, strict=True) if m]
    starts = [sum(enc.turn_lengths[:i]) for i in range(len(enc.turn_lengths))]
    return [labels[s : s + n] for s, n in zip(starts, enc.turn_lengths, strict=True)]


def collate_mimic(encoder: SampleEncoder, examples: Sequence[MimicExample], bridge: TokenBridge | None = None
                  ) -> MimicBatch:
    """One micro-batch; with a `bridge` (a student with another tokenizer) the student's own
    encoding of each conversation gives the labels, and the teacher rows are restated for them."""
    if bridge is None:
        encoded = [encode_mimic(encoder, e) for e in examples]
    else:  # encoded once: its response tokens are the labels the rows are restated for
        encoded = [encoder.encode(e.messages, [encoder.image_features(im) for im in e.images]) for e in examples]
        examples = [bridge.mimic_rows(encoder, e, _turns(enc))[0] for e, enc in zip(examples, encoded, strict=True)]
    rows, cols = _label_index(encoded)
    sampled_ids = sampled_weights = None
    if examples and all(e.sampled_ids is not None for e in examples):
        ids = [i for e in examples for i in e.sampled_ids]
        counts = [c for e in examples for c in e.sampled_counts]
        width = max((len(i) for i in ids), default=1)
        sampled_ids = torch.zeros((len(ids), width), dtype=torch.long)
        sampled_weights = torch.zeros((len(ids), width), dtype=torch.float32)
        for n, (i, c) in enumerate(zip(ids, counts)):
            sampled_ids[n, : len(i)] = torch.tensor(i, dtype=torch.long)
            sampled_weights[n, : len(c)] = torch.tensor(c, dtype=torch.float32) / max(1, sum(c))
    kd_mask = None
    if examples and examples[0].kd_mask is not None:
        kd_mask = torch.tensor([m for e in examples for m in e.kd_mask], dtype=torch.bool)
    return MimicBatch(
        inputs=batch_inputs(encoder, [e.ids for e in encoded], [e.images for e in encoded]),
        rows=rows, cols=cols,
        topk_ids=_rows(examples, "topk_ids", torch.long, pad=0),
        topk_logprobs=_rows(examples, "topk_logprobs", torch.float32, pad=float("-inf")),
        rest_mass=_rows(examples, "rest_mass", torch.float32),
        sampled_ids=sampled_ids, sampled_weights=sampled_weights, kd_mask=kd_mask,
    )


def collate_pref(encoder: SampleEncoder, examples: Sequence[PrefExample], bridge: TokenBridge | None = None
                 ) -> PrefBatch:
    pairs = [encode_pref(encoder, e, own_tokens=bridge is not None) for e in examples]
    encoded = [c for c, _ in pairs] + [r for _, r in pairs]
    rows, cols = _label_index(encoded)
    return PrefBatch(
        inputs=batch_inputs(encoder, [e.ids for e in encoded], [e.images for e in encoded]),
        rows=rows, cols=cols,
        ref_chosen=torch.tensor([e.ref_chosen for e in examples], dtype=torch.float64),
        ref_rejected=torch.tensor([e.ref_rejected for e in examples], dtype=torch.float64),
        chosen_tokens=sum(len(label_positions(c)) for c, _ in pairs),
    )


_COLLATE = {"mimic": collate_mimic, "pref": collate_pref}


# ----------------------------------------------------------------------------------------------
# The streamed data set


@dataclass
class LoaderFailure:
    """A worker's one-line error, carried to the trainer instead of a worker traceback."""

    message: str


class MixedOrder:
    """Global micro-batch `step` drawn from several sources (the --dump directories) at fixed
    shares: `counts[i]` rows from source i, whose rows are the global rows offset[i] ..; each
    source is its own BatchOrder (seed + i) and goes through its epochs at its own pace, so a small
    source is repeated rather than diluted. A pure function of its inputs, like BatchOrder."""

    def __init__(self, source_groups: Sequence[Sequence[int]], counts: Sequence[int], seed: int = 0, window: int = 8,
                 shuffle: bool = True):
        self.orders = [BatchOrder(groups, seed=seed + i, window=window, shuffle=shuffle)
                       for i, groups in enumerate(source_groups)]
        self.counts = list(counts)
        self.offsets = [0]
        for order in self.orders[:-1]:
            self.offsets.append(self.offsets[-1] + order.rows)

    @property
    def rows(self) -> int:
        return sum(o.rows for o in self.orders)

    def batch(self, step: int, batch_size: int) -> list[int]:
        if batch_size != sum(self.counts):
            raise ValueError(f"a mixed batch holds {sum(self.counts)} rows, not {batch_size}")
        return [offset + r for order, offset, n in zip(self.orders, self.offsets, self.counts, strict=True)
                for r in order.batch(step, n)]


class MicroBatches(torch.utils.data.Dataset):
    """Item i: this rank's share (rows rank::world) of global micro-batch i, read from the row groups
    that hold it, images decoded and checked, encoded with the student's processor and collated.
    Runs in DataLoader workers; each keeps at most `cache_groups` row groups (the shuffle window)
    of the columns it needs, so memory does not grow with the data."""

    def __init__(self, kind: str, files: Sequence[Path], student: Path, image_root: Path | None,
                 batch_size: int, seed: int = 0, shuffle: bool = True, window: int = 8, rank: int = 0,
                 world: int = 1, sampled: bool = False, bridge: TokenBridge | None = None,
                 mix: Sequence[int] | None = None, file_sources: Sequence[int] | None = None):
        """`mix`: rows per batch from each source (see MixedOrder), `file_sources` the source of
        each file (files of a source consecutive); without them all rows are shuffled together."""
        self.kind, self.student, self.image_root, self.bridge = kind, Path(student), image_root, bridge
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.columns = columns(kind, sampled)
        self.index = ShardIndex(files)
        self.order: BatchOrder | MixedOrder
        if mix is None:
            self.order = BatchOrder([g.rows for g in self.index.groups], seed=seed, window=window, shuffle=shuffle)
        else:
            source_of = {str(f): s for f, s in zip(files, file_sources or [], strict=True)}
            groups: list[list[int]] = [[] for _ in mix]
            for g in self.index.groups:
                groups[source_of[g.path]].append(g.rows)
            self.order = MixedOrder(groups, mix, seed=seed, window=window, shuffle=shuffle)
        self.cache_groups = window
        self._encoder: SampleEncoder | None = None
        self._tables: OrderedDict[int, pa.Table] = OrderedDict()

    @property
    def encoder(self) -> SampleEncoder:
        if self._encoder is None:  # loaded in the worker: processors need not survive pickling
            self._encoder = load_encoder(self.student)
        return self._encoder

    def rows_of(self, step: int) -> list[int]:
        """Global rows this rank reads for micro-batch `step`."""
        return self.order.batch(step, self.batch_size)[self.rank :: self.world]

    def examples(self, step: int) -> tuple[list[MimicExample] | list[PrefExample], list[str]]:
        """This rank's examples of micro-batch `step` and where each comes from (shard, row, id)."""
        out, wheres = [], []
        for row in self.rows_of(step):
            g, r = self.index.locate(row)
            group = self.index.groups[g]
            record = self._table(g).slice(r, 1).to_pylist()[0]
            wheres.append(f"{group.path} row {group.first_row + r} (id {record['sample_id']})")
            out.append(_EXAMPLE[self.kind](record, self.image_root, wheres[-1], Path(group.path).parent.parent))
        return out, wheres

    def __getitem__(self, step: int) -> MimicBatch | PrefBatch | LoaderFailure:
        try:
            examples, wheres = self.examples(step)
        except ShardError as e:
            return LoaderFailure(str(e))
        try:
            return _COLLATE[self.kind](self.encoder, examples, self.bridge)
        except ValueError:  # the student's template or processor refuses a sample?
            for example, where in zip(examples, wheres):  # the error path only: find the sample and say why
                try:
                    _COLLATE[self.kind](self.encoder, [example], self.bridge)
                except ValueError as e:
                    return LoaderFailure(f"{where}: the student ({self.student}) cannot encode it: {e}")
            raise  # no sample fails alone: not the data's fault, the error as it is

    def _table(self, g: int) -> pa.Table:
        if g in self._tables:
            self._tables.move_to_end(g)
            return self._tables[g]
        group = self.index.groups[g]
        table = read_row_group(pq.ParquetFile(group.path), group.group, self.columns)
        self._tables[g] = table
        while len(self._tables) > self.cache_groups:
            self._tables.popitem(last=False)
        return table

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoder": None, "_tables": OrderedDict()}


def _as_is(item):
    return item


def loader(data: MicroBatches, start: int, stop: int, workers: int = 2) -> torch.utils.data.DataLoader:
    """Micro-batches start..stop-1 in order, prepared by `workers` processes (0: in this one)."""
    return torch.utils.data.DataLoader(
        data, batch_size=None, sampler=range(start, stop), num_workers=workers,
        collate_fn=_as_is, prefetch_factor=4 if workers else None,
        multiprocessing_context="fork" if workers else None,
    )


def student_coverage(dump_dir: Path, student: Path, rows: int = 256, project: str = "first_token"
                     ) -> dict[str, Any]:
    """What `lmod train` would say of this dump and student, without training: whether the tokenizers
    differ and, when they do, the paired share of response positions and of top-k mass (first rows)."""
    from itertools import islice

    from student_train.cross_tokenizer import TokenBridge

    encoder = load_encoder(student)
    dumps = Dumps.open([Path(dump_dir)])
    bridge = TokenBridge.for_dumps(dumps, encoder, project)
    if bridge is None:
        return {"model": str(student), "tokenizer": "the teacher's", "paired_positions": 1.0, "mapped_topk_mass": 1.0}
    files = check_shards(dumps, "mimic", encoder, allow_partial=True, verify=False, cross=True)
    coverage = bridge.coverage(encoder, islice(iter_examples(files, "mimic", None, with_image=False), rows))
    return {"model": str(student), "tokenizer": "another (cross-tokenizer distillation)",
            "vocabulary_mapped_share": round(bridge.vocab.mapped_share(), 4), **coverage.as_dict()}
