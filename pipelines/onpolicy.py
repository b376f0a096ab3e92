"""`lmod onpolicy`: on-policy distillation in rounds, the teacher never beside the student.

Each round N (from 1) takes the current student (the given one, then round N-1's):
  OUT/round-N/samples.jsonl  the student's sampled answers to the prompts (`lmod generate`; the
                             sampled ids are kept, so the teacher scores exactly them)
  OUT/round-N/dump/          the teacher's top-k (and RS-KD draws) at those tokens (`lmod dump-teacher`):
                             an ordinary dump
  OUT/round-N/student/       mimic distillation on that dump (`lmod train`), the next round's student
  OUT/round-N/round.json     the round's accounting, written last: a round with it is finished
Every step resumes on its own (generation by whole batches, the dump by shards, training from its
last checkpoint), so a killed run, rerun, continues the round it was in and keeps finished rounds.
The teacher's fingerprint is recorded in OUT/onpolicy.json: another teacher is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shared.manifest import atomic_write_bytes
from student_train.config import TrainConfig

STATE_FILE = "onpolicy.json"
ROUND_FILE = "round.json"


class OnPolicyError(ValueError):
    """A run that cannot start or go on; the message says which flag or file and what to do."""


@dataclass
class OnPolicyConfig:
    teacher: Path
    student: Path
    data: Path  # prompts (and images): any file dump-teacher reads; the answers are the student's
    out: Path
    rounds: int
    train: TrainConfig  # each round's mimic training (steps per round)
    image_root: Path | None = None
    backend: str = "vllm"  # the teacher's dump; generation too where vLLM loads the student (else hf)
    generate_backend: str | None = None  # default: `backend`, or hf for a student vLLM cannot load
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    top_k: int = 32
    sample: int = 0  # RS-KD draws per position (for kd: sampled)
    shards: int = 1
    seed: int = 0
    max_model_len: int | None = None  # default: the shorter of the two models' positions, at most 2,048
    offpolicy: list[Path] = field(default_factory=list)  # off-policy dumps trained beside each round's
    # GKD's lambda: the share of every batch from the round's samples, the rest from `offpolicy`
    # (split evenly); None: their rows shuffled together, in proportion to their number.
    onpolicy_fraction: float | None = None
    # Each round on the next this-many records of --data (a JSONL file; wrapping around), instead of
    # every record every round: more distinct prompts for the same teacher cost.
    prompts_per_round: int | None = None
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        """What a rerun must share with the run it continues."""
        keep = {k: v for k, v in asdict(self).items() if k not in ("rounds", "progress", "out")}
        return json.loads(json.dumps(keep, default=str))


def _say(cfg: OnPolicyConfig, line: str) -> None:
    if cfg.progress:
        print(line, file=sys.stderr, flush=True)


def check(cfg: OnPolicyConfig) -> None:
    if cfg.rounds < 1:
        raise OnPolicyError(f"--rounds {cfg.rounds}: at least 1")
    if cfg.train.stage != "mimic":
        raise OnPolicyError("on-policy rounds train mimic distillation: use a mimic config (stage: mimic)")
    if cfg.train.kd == "sampled" and cfg.sample <= 0:
        raise OnPolicyError("kd: sampled needs the teacher's draws: pass --sample N")
    if cfg.temperature <= 0:
        raise OnPolicyError("--temperature must be > 0: on-policy samples are drawn from the student")
    if not Path(cfg.data).exists():
        raise OnPolicyError(f"--data {cfg.data}: no such file or directory")
    if cfg.prompts_per_round is not None:
        if cfg.prompts_per_round < 1:
            raise OnPolicyError(f"--prompts-per-round {cfg.prompts_per_round}: at least 1")
        if Path(cfg.data).suffix != ".jsonl":
            raise OnPolicyError(f"--prompts-per-round takes a JSONL --data ({cfg.data} is not); convert it or drop "
                                "the flag")
    if cfg.onpolicy_fraction is not None:
        if not cfg.offpolicy:
            raise OnPolicyError("--onpolicy-fraction mixes the round's samples with an off-policy dump: pass "
                                "--offpolicy-dump DIR")
        if not 0 < cfg.onpolicy_fraction < 1:
            raise OnPolicyError(f"--onpolicy-fraction {cfg.onpolicy_fraction}: must be between 0 and 1 (exclusive)")
        if cfg.train.dump_mix is not None:
            raise OnPolicyError("--onpolicy-fraction and the config's dump_mix both set the mix: keep one")
        try:  # a batch too small for the shares: said now, not at round 1's training
            replace(cfg.train, dump_mix=_round_mix(cfg))
        except ValueError as e:
            raise OnPolicyError(f"--onpolicy-fraction {cfg.onpolicy_fraction}: {e}") from None
    for d in cfg.offpolicy:
        if not (Path(d) / "manifest.json").is_file():
            raise OnPolicyError(f"--offpolicy-dump {d}: not a dump (no manifest.json)")
    from shared.models import read_config

    limits = {}
    for what, model in (("--teacher", cfg.teacher), ("--student", cfg.student)):
        config = read_config(model)
        limits[what] = config.get("text_config", config).get("max_position_embeddings") or 2048
    if cfg.max_model_len is None:
        cfg.max_model_len = min(2048, *limits.values())
    for what, positions in limits.items():
        if cfg.max_model_len > positions:
            raise OnPolicyError(f"--max-model-len {cfg.max_model_len} exceeds the {positions} positions of {what}; "
                                "lower it")
    from teacher_dump.generate import read_prompts

    read_prompts(cfg.data, cfg.image_root)  # a bad record is one line now, not in round N's generation


def _round_mix(cfg: OnPolicyConfig) -> list[float] | None:
    """dump_mix of a round's training: the round's dump first, then the off-policy dumps."""
    if cfg.onpolicy_fraction is None:
        return cfg.train.dump_mix
    rest = (1.0 - cfg.onpolicy_fraction) / len(cfg.offpolicy)
    return [cfg.onpolicy_fraction, *[rest] * len(cfg.offpolicy)]


def _record_state(cfg: OnPolicyConfig) -> None:
    """OUT/onpolicy.json: the teacher's fingerprint and the settings; a rerun must match both."""
    from shared.fingerprint import teacher_fingerprint

    finger = teacher_fingerprint(cfg.teacher)
    teacher = {k: finger[k] for k in ("config_sha256", "weights_sha256")}
    path = Path(cfg.out) / STATE_FILE
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            recorded = old["settings"]
        except (ValueError, KeyError, TypeError):
            raise OnPolicyError(f"{path}: damaged (not the JSON lmod onpolicy writes); move it away to start the "
                                "rounds in this --out again, or use another --out") from None
        if old.get("teacher") != teacher:
            raise OnPolicyError(f"--teacher {cfg.teacher}: not the teacher of the rounds in {cfg.out} (its weights or "
                                "config differ); every round must be scored by one teacher: use another --out")
        changed = sorted(k for k, v in cfg.settings().items() if k != "teacher" and not _same(recorded.get(k), v))
        if changed:
            raise OnPolicyError(f"{cfg.out}: its rounds were made with other settings ({', '.join(changed)}); rerun "
                                "them as they were, or use another --out")
        return
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, (json.dumps({"teacher": teacher, "settings": cfg.settings()}, indent=1) + "\n").encode())


def _same(recorded: Any, now: Any) -> bool:
    """Equal, where a config recorded by an older lmod lacks keys added since (at their defaults)."""
    if isinstance(recorded, dict) and isinstance(now, dict):
        return all(_same(v, now.get(k)) for k, v in recorded.items())
    return recorded == now


def _generation_backend(cfg: OnPolicyConfig, student: Path) -> str:
    """vLLM where it loads the student's architecture, else transformers."""
    if cfg.generate_backend:
        return cfg.generate_backend
    if cfg.backend != "vllm":
        return cfg.backend
    from shared.models import read_config, vllm_mismatch

    if vllm_mismatch(student) is not None:
        return "hf"
    try:
        from vllm import ModelRegistry

        archs = read_config(student).get("architectures") or []
        return "vllm" if archs and all(a in ModelRegistry.get_supported_archs() for a in archs) else "hf"
    except Exception:  # vLLM's registry unavailable: transformers generates
        return "hf"


def _round_prompts(cfg: OnPolicyConfig, n: int, here: Path) -> Path:
    """--data, or with --prompts-per-round round n's slice of it (OUT/round-N/prompts.jsonl)."""
    if cfg.prompts_per_round is None:
        return Path(cfg.data)
    path = here / "prompts.jsonl"
    if not path.is_file():
        lines = [line for line in Path(cfg.data).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise OnPolicyError(f"--data {cfg.data}: no records")
        start = (n - 1) * cfg.prompts_per_round
        chosen = [lines[(start + i) % len(lines)] for i in range(cfg.prompts_per_round)]
        atomic_write_bytes(path, "".join(line + "\n" for line in chosen).encode())
    return path


def run_round(cfg: OnPolicyConfig, n: int, student: Path) -> dict[str, Any]:
    """Round n from `student`: samples, the teacher's dump of them, mimic training; resumable."""
    from shared.shards import dump_info
    from student_train.train import LATEST, train
    from teacher_dump.generate import STATE_SUFFIX
    from teacher_dump.run import DumpConfig, dump_teacher

    here = Path(cfg.out) / f"round-{n}"
    here.mkdir(parents=True, exist_ok=True)
    image_root = cfg.image_root or (Path(cfg.data) if Path(cfg.data).is_dir() else Path(cfg.data).parent)
    samples = here / "samples.jsonl"
    prompts = _round_prompts(cfg, n, here)
    backend = _generation_backend(cfg, student)
    state = samples.with_name(samples.name + STATE_SUFFIX)
    if samples.exists() and state.is_file():  # a round being continued: with the backend it started with
        backend = json.loads(state.read_text())["settings"]["backend"]
    _say(cfg, f"lmod: round {n}: the student ({student}) answers {prompts} ({backend})")

    def sample_with(backend: str) -> subprocess.CompletedProcess:
        # Its own process: the engine's memory (a GPU's, with vLLM) is back before the teacher and
        # the training start, and no engine thread is left behind in this process to fork under.
        args = [sys.executable, "-m", "pipelines.cli", "generate", "--model", str(student), "--data", str(prompts),
                "--out", str(samples), "--image-root", str(image_root), "--backend", backend,
                "--temperature", repr(cfg.temperature), "--top-p", repr(cfg.top_p),
                "--max-new-tokens", str(cfg.max_new_tokens), "--seed", str(cfg.seed * 1000 + n),
                "--dtype", cfg.train.dtype, "--max-model-len", str(cfg.max_model_len)]
        return subprocess.run(args, stdout=subprocess.PIPE, stderr=None if cfg.progress else subprocess.PIPE,
                              text=True)

    done = sample_with(backend)
    if done.returncode and backend == "vllm" and not cfg.generate_backend and not samples.exists():
        # vLLM knows the architecture but could not load this student (e.g. a reshaped text model)
        _say(cfg, f"lmod: round {n}: vLLM could not load the student; generating with transformers")
        cfg.generate_backend = "hf"  # the later rounds' students are of the same kind
        done = sample_with("hf")
    if done.returncode:
        why = (done.stderr or "").strip().splitlines()[-1:] or ["its error is printed above"]
        raise OnPolicyError(f"round {n}: generating {samples} failed ({why[0]}); fix that and rerun (finished "
                            "batches are kept)")
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    generated = sum(r["generation"]["tokens"] for r in records)
    _say(cfg, f"lmod: round {n}: the teacher scores the {len(records)} samples ({cfg.backend})")
    dump = here / "dump"
    dump_teacher(DumpConfig(model=Path(cfg.teacher), out=dump, mimic_data=samples, image_root=image_root,
                            shards=cfg.shards, top_k=cfg.top_k, sample=cfg.sample, sample_seed=cfg.seed * 1000 + n,
                            backend=cfg.backend, max_model_len=cfg.max_model_len, progress=cfg.progress,
                            skip_invalid=True))
    info = dump_info(dump)["mimic"]
    run = here / "student"
    mixed = f" ({cfg.onpolicy_fraction:.0%} of each batch on-policy)" if cfg.onpolicy_fraction is not None else ""
    _say(cfg, f"lmod: round {n}: the student trains {cfg.train.steps} steps on the round's dump"
              + (f" and {len(cfg.offpolicy)} off-policy dump(s){mixed}" if cfg.offpolicy else ""))
    round_cfg = replace(cfg.train, seed=cfg.train.seed + n - 1, dump_mix=_round_mix(cfg))
    history = train([dump, *map(Path, cfg.offpolicy)], student, run, round_cfg,
                    image_root=image_root, resume=(run / LATEST).exists(), progress=cfg.progress)
    last = history[-1] if history else json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    summary = {"round": n, "student_in": str(student), "samples": len(records), "generated_tokens": generated,
               "teacher_scored_rows": info["rows"], "teacher_scored_tokens": info["tokens"],
               "steps": cfg.train.steps, "final_loss": last.get("loss"), "final_kl": last.get("kl")}
    atomic_write_bytes(here / ROUND_FILE, (json.dumps(summary, indent=1) + "\n").encode())
    return summary


def run_onpolicy(cfg: OnPolicyConfig) -> list[dict[str, Any]]:
    """Every round, the finished ones kept; returns their accounting (one dict per round)."""
    check(cfg)
    _record_state(cfg)
    student = Path(cfg.student)
    rounds = []
    for n in range(1, cfg.rounds + 1):
        done = Path(cfg.out) / f"round-{n}" / ROUND_FILE
        kept = done.is_file()
        summary = json.loads(done.read_text()) if kept else run_round(cfg, n, student)
        rounds.append(summary)
        _say(cfg, f"lmod: round {n}{' (finished earlier)' if kept else ''}: "
                  f"the student generated {summary['generated_tokens']:,} tokens; the teacher scored "
                  f"{summary['teacher_scored_tokens']:,} response tokens ({summary['teacher_scored_rows']} samples, "
                  "earlier turns of multi-turn prompts included); "
                  f"{summary['steps']} steps, final loss {summary['final_loss']:.4g}")
        student = Path(cfg.out) / f"round-{n}" / "student"
    return rounds
