"""`lmod generate`: answers from any model (the teacher's: sequence-level distillation data; a
student's: the start of on-policy distillation) written as lmod mimic records with provenance.

Input: any file `dump-teacher` reads. A record with a conversation has its last answer replaced (or
one added after a final question); a record with a `question` (or `prompt`) string is one question.
Every record is checked before the model loads. Output: JSONL, one mimic record per input record in
input order, each with a `generation` entry (the model's fingerprint, backend, sampling settings,
seed). Written in whole batches and resumable: a rerun with the same settings continues after the
last finished batch, so an interrupted and a straight run write the same bytes.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.fingerprint import sha256_file, teacher_fingerprint
from shared.images import open_rgb
from shared.mllm import load_encoder
from shared.prompt import llava_messages
from teacher_dump.backends import GenerateRequest, Sampling, make_generator
from teacher_dump.inputs import (
    InputError,
    _check_image,
    _images,
    _where,
    canonical,
    count_rows,
    generated_id,
    iter_slice,
    plan_slices,
)
from teacher_dump.worker import record_seed

STATE_SUFFIX = ".lmod-generate.json"


@dataclass
class GenerateConfig:
    model: Path
    data: Path
    out: Path
    image_root: Path | None = None
    backend: str = "vllm"
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    batch_size: int = 16
    dtype: str = "float32"
    max_model_len: int = 2048


@dataclass
class Prompt:
    sample_id: str
    turns: list[dict[str, str]]  # ends with a human turn
    images: list[Any]  # as given (paths), written back unchanged
    image_paths: list[str]


def read_prompts(path: Path, image_root: Path | None) -> list[Prompt]:
    """Every record of the input as a question to answer; the first bad one is an InputError naming
    its file and row."""
    path = Path(path)
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    rows = count_rows(path)
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for sl in plan_slices(path, "mimic", 1, rows) if rows else []:
        for row, rec, err in iter_slice(sl):
            where = _where(path, row)
            try:
                if err:
                    raise ValueError(err)
                if not isinstance(rec, dict):
                    raise ValueError("record is not an object")
                prompts.append(_prompt(path, row, rec, root))
            except ValueError as e:
                raise InputError(f"{where}: {e}; fix the record") from None
            if prompts[-1].sample_id in seen:
                raise InputError(f"{where}: duplicate id {prompts[-1].sample_id!r}")
            seen.add(prompts[-1].sample_id)
    if not prompts:
        raise InputError(f"{path}: no records; nothing to generate")
    return prompts


def _prompt(path: Path, row: int, rec: dict, root: Path) -> Prompt:
    sid = str(rec["id"]) if rec.get("id") is not None else generated_id(path, row)
    if "conversations" in rec or "messages" in rec:
        turns = [dict(t) for t in canonical("mimic", rec)["conversations"]]
        if not turns or not all(isinstance(t, dict) and t.get("from") in ("human", "gpt")
                                and isinstance(t.get("value"), str) for t in turns):
            raise ValueError("'conversations' must be a non-empty list of {'from': 'human'|'gpt', 'value': str}")
        if turns[-1]["from"] == "gpt":
            turns = turns[:-1]  # the last answer is the one generated anew
        if not turns or turns[-1]["from"] != "human":
            raise ValueError("the conversation has no question to answer")
    else:
        question = rec.get("question", rec.get("prompt"))
        if not isinstance(question, str) or not question.strip():
            raise ValueError("give 'conversations', 'messages', or a 'question' (or 'prompt') string")
        turns = [{"from": "human", "value": question}]
    images = _images(rec)
    refs = [_check_image(raw, root) for raw in images]
    if any(r.data is not None for r in refs):
        raise ValueError("inline image bytes; lmod generate reads images by path (--image-root)")
    return Prompt(sid, turns, images, [r.path for r in refs])


def _settings(cfg: GenerateConfig) -> dict[str, Any]:
    """What decides the output's bytes; a resume must match it."""
    finger = teacher_fingerprint(cfg.model)
    return {"model": finger["model"], "model_config_sha256": finger["config_sha256"][:16],
            "model_weights_sha256": finger["weights_sha256"][:16], "backend": cfg.backend,
            **asdict(cfg.sampling), "seed": cfg.seed, "batch_size": cfg.batch_size, "dtype": cfg.dtype,
            "input": str(Path(cfg.data).resolve()), "input_sha256": sha256_file(Path(cfg.data))
            if Path(cfg.data).is_file() else None}


def _finished_lines(out: Path, batch_size: int) -> int:
    """Records already written, in whole batches; a torn tail (a kill mid-write) is cut off."""
    if not out.exists():
        return 0
    data = out.read_bytes()
    lines = data.count(b"\n")
    keep = (lines // batch_size) * batch_size
    offset = 0
    for _ in range(keep):
        offset = data.index(b"\n", offset) + 1
    if offset != len(data):
        with open(out, "r+b") as f:
            f.truncate(offset)
    return keep


ENGINE_LOG_SUFFIX = ".engine.log"


@contextmanager
def engine_output_to(log: Path) -> Iterator[None]:
    """The engine's own output (vLLM's warnings, C++ and library prints, at the file-descriptor
    level) appended to `log` instead of the terminal, for as long as the block runs."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with open(log, "ab") as f:
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def generate(cfg: GenerateConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Answer every record of cfg.data with cfg.model into cfg.out (resumable); returns a summary."""
    if cfg.backend not in ("vllm", "hf"):
        raise InputError(f"--backend {cfg.backend!r}: use vllm or hf")
    s = cfg.sampling
    if not (s.temperature >= 0 and 0 < s.top_p <= 1 and s.max_new_tokens >= 1 and cfg.batch_size >= 1):
        raise InputError("sampling: --temperature >= 0, --top-p in (0, 1], --max-new-tokens >= 1, --batch-size >= 1")
    out = Path(cfg.out)
    if out.is_dir():
        raise InputError(f"{out}: a directory; --out is the JSONL file to write")
    if out.resolve() == Path(cfg.data).resolve():
        raise InputError(f"{out}: that is the input file; choose another --out")
    prompts = read_prompts(cfg.data, cfg.image_root)
    settings = _settings(cfg)
    state = out.with_name(out.name + STATE_SUFFIX)
    if out.exists():
        if not state.is_file():
            raise InputError(f"{out}: exists and was not written by lmod generate; choose another --out")
        before = json.loads(state.read_text())
        changed = sorted(k for k in settings if before.get("settings", {}).get(k) != settings[k])
        if changed:
            raise InputError(f"{out}: written with other settings ({', '.join(changed)}); use another --out to "
                             "generate with these")
    out.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"settings": settings, "records": len(prompts), "complete": False}, indent=2) + "\n")
    done = _finished_lines(out, cfg.batch_size)
    summary = {"out": str(out), "records": len(prompts), "resumed_after": done, "generated_tokens": 0,
               "prompt_tokens": 0}
    if done < len(prompts):
        _run(cfg, prompts, done, out, settings, summary, progress)
        gc.collect()  # the engine: a vLLM engine made next in this process needs its memory back
    summary["complete"] = True
    state.write_text(json.dumps({"settings": settings, **summary}, indent=2) + "\n")
    return summary


def _run(cfg: GenerateConfig, prompts: list[Prompt], done: int, out: Path, settings: dict[str, Any],
         summary: dict[str, Any], progress: Callable[[int, int], None] | None) -> None:
    encoder = load_encoder(cfg.model)
    log = out.with_name(out.name + ENGINE_LOG_SUFFIX)
    with engine_output_to(log):
        engine = make_generator(cfg.backend, cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                                max_images=max(1, max(len(p.images) for p in prompts)))
    provenance = {k: settings[k] for k in ("model", "model_weights_sha256", "backend", "temperature", "top_p",
                                           "max_new_tokens", "seed")}
    with open(out, "ab") as f:
        for start in range(done, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            requests = []
            for p in batch:
                pil = [open_rgb(path) for path in p.image_paths]
                features = [encoder.image_features(im) for im in pil]
                enc = encoder.encode_prompt(llava_messages(p.turns, len(pil)), features)
                if len(enc.ids) + cfg.sampling.max_new_tokens > cfg.max_model_len:
                    raise InputError(f"{p.sample_id}: {len(enc.ids)} prompt tokens + --max-new-tokens exceed "
                                     f"--max-model-len {cfg.max_model_len}")
                requests.append(GenerateRequest(enc.prompt_ids, enc.ids, pil, enc.images,
                                                record_seed(cfg.seed, p.sample_id)))
            with engine_output_to(log):
                answers = engine.generate(requests, cfg.sampling)
            lines = []
            for p, req, ids in zip(batch, requests, answers):
                text = encoder.tokenizer.decode([t for t in ids if t not in encoder.eos_ids], skip_special_tokens=True)
                finish = "stop" if ids and ids[-1] in encoder.eos_ids else "length"
                record: dict[str, Any] = {"id": p.sample_id}
                if p.images:
                    record["image" if len(p.images) == 1 else "images"] = p.images[0] if len(p.images) == 1 \
                        else p.images
                record["conversations"] = [*p.turns, {"from": "gpt", "value": text}]
                # The sampled ids themselves: a dump by a teacher of the same vocabulary scores exactly
                # them (decoding and encoding again can split the text otherwise).
                record["generation"] = {**provenance, "record_seed": req.seed, "tokens": len(ids), "finish": finish,
                                        "vocab_sha256": encoder.vocab_sha256, "response_ids": [int(t) for t in ids]}
                lines.append(json.dumps(record, ensure_ascii=False) + "\n")
                summary["generated_tokens"] += len(ids)
                summary["prompt_tokens"] += len(req.ids)
            f.write("".join(lines).encode())  # one batch at a time: a resume starts at a batch boundary
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(min(start + cfg.batch_size, len(prompts)), len(prompts))
