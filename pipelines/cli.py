"""The `lmod` command line (typer). Commands are thin: they parse options and call components."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Offline teacher-logit distillation for tiny MLLMs.")
world_app = typer.Typer(no_args_is_help=True, help="The tiny embedded world (images, questions, preference pairs).")
teacher_app = typer.Typer(no_args_is_help=True, help="Teacher models.")
shards_app = typer.Typer(no_args_is_help=True, help="Inspect and verify teacher shard dumps.")
app.add_typer(world_app, name="world")
app.add_typer(teacher_app, name="teacher")
app.add_typer(shards_app, name="shards")


def fail(msg: str, code: int = 2) -> None:
    """One error line and exit. Under torchrun every rank stops with the same error; rank 0 says it."""
    if os.environ.get("RANK", "0") == "0":
        typer.secho(f"lmod: error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def require_model(path: Path, option: str) -> Path:
    """A local model directory (a .gguf file: its converted directory, made once and cached), or a
    one-line error (transformers would go looking on the hub)."""
    from shared.models import ModelError, is_gguf, read_config, resolve_model

    if not is_gguf(path) and not (path / "config.json").is_file():
        fail(f"{path}: no config.json; {option} must be a local model directory (or a .gguf file)")
    try:
        if is_gguf(path):
            typer.echo(f"{option} {path}: a GGUF file; using its transformers conversion (made once, cached)",
                       err=True)
            path = resolve_model(path)
        read_config(path)
    except ModelError as e:
        fail(f"{e} ({option})")
    return path


def check_environment() -> None:
    """PyPI's torchvision beside the CPU torch breaks transformers' model imports: say so plainly."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # the broken wheel raises RuntimeError/OSError depending on the build
        fail("torchvision is installed but cannot load beside this torch; "
             "run `pip uninstall -y torchvision torchaudio torchcodec` (see README, Install)")


@world_app.command("make")
def world_make(
    out: Path = typer.Option(..., help="Directory to write images/ and the JSONL files into."),
    seed: int = typer.Option(0),
    n_mimic: int = typer.Option(2000, min=0, help="Conversation records for mimic distillation."),
    n_pref: int = typer.Option(500, min=0, help="Preference pairs."),
    n_eval: int = typer.Option(400, min=0, help="Held-out evaluation questions (half POPE-style)."),
) -> None:
    """Write DIR/mimic.jsonl, DIR/pref.jsonl, DIR/eval.jsonl and DIR/images/."""
    from pipelines.toy.world import make_world

    paths = make_world(out, seed, n_mimic, n_pref, n_eval)
    typer.echo(json.dumps({k: str(v) for k, v in paths.items()}))


@teacher_app.command("make-tiny")
def teacher_make_tiny(
    world: Path = typer.Option(..., help="A directory written by `lmod world make`."),
    out: Path = typer.Option(..., help="Where to save the teacher (transformers format)."),
    steps: int = typer.Option(1800, help="SFT steps (0: random init)."),
    batch_size: int = typer.Option(32),
    lr: float = typer.Option(1e-3),
    seed: int = typer.Option(0),
    eval_data: Path | None = typer.Option(None, help="Eval JSONL to report held-out accuracy on."),
) -> None:
    """Build the tiny Idefics3 teacher and train it on the world (plain SFT)."""
    check_environment()
    from pipelines.toy.tiny_teacher import make_tiny_teacher

    if (out / "config.json").exists():
        fail(f"{out} already holds a model; choose another --out")
    if not (world / "mimic.jsonl").is_file():
        fail(f"{world}: no mimic.jsonl; --world must be a directory written by `lmod world make`")
    recipe = make_tiny_teacher(world, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    if eval_data is not None:
        from shared.evaluation import evaluate_model

        recipe["eval"] = evaluate_model(out, eval_data)
        (out / "lmod_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    typer.echo(json.dumps(recipe, indent=2))


@app.command("dump-teacher")
def dump_teacher_cmd(
    model: Path = typer.Option(..., help="Teacher: a model directory (transformers format, multimodal or text-only) "
                               "or a .gguf file."),
    out: Path = typer.Option(..., help="Dump directory (manifest.json, mimic/, pref/)."),
    mimic_data: Path | None = typer.Option(None, help="LLaVA-style conversations: .jsonl/.json/.parquet/datasets dir."),
    pref_data: Path | None = typer.Option(None, help="Preference pairs (id, image, question, chosen, rejected)."),
    image_root: Path | None = typer.Option(None, help="Root of image paths (default: the data file's directory)."),
    shards: int = typer.Option(8, help="Shards per data kind (capped at the number of records)."),
    top_k: int = typer.Option(32, help="Teacher log-probs kept per response token."),
    encoding: str = typer.Option("u8", help="Stored probabilities: u8 (8-bit sqrt scale) | u16 | f32 (exact)."),
    sample: int = typer.Option(0, help="RS-KD: also store N draws per response position from the teacher's "
                               "full distribution."),
    sample_seed: int = typer.Option(0, help="Seed of those draws (with each record's id)."),
    backend: str = typer.Option("vllm", help="vllm | hf"),
    vllm_scoring: str = typer.Option("hidden", help="vllm: hidden (the head at scored positions only) | logprobs "
                                     "(prompt_logprobs over every position, the earlier path)"),
    dtype: str = typer.Option("float32", help="Teacher dtype: float32 | bfloat16 | float16."),
    max_model_len: int = typer.Option(512, help="Longest sequence; longer records are invalid."),
    max_images: int = typer.Option(1, help="Most images in one sample (raise it for multi-image conversations); "
                                   "more is invalid."),
    address: str | None = typer.Option(None, help="Ray cluster address; a local Ray starts when absent."),
    workers: int | None = typer.Option(None, help="Teacher workers (default: one per GPU group, else one)."),
    tensor_parallel_size: int = typer.Option(1, help="GPUs per teacher engine (vllm), for teachers too big for one."),
    gpu_memory_utilization: float | None = typer.Option(None, help="vLLM's share of GPU memory (default 0.9)."),
    force: bool = typer.Option(False, help="Redo all shards, replacing what OUT holds."),
    skip_invalid: bool = typer.Option(False, help="Drop invalid records (to OUT/rejected.jsonl) instead of stopping."),
    dry_run: bool = typer.Option(False, help="Validate every record and print the shard plan; start no teacher."),
    verbose: bool = typer.Option(False, help="Show the teacher engines' own output here (else in OUT/logs/)."),
) -> None:
    """Run the teacher over the data on Ray and write top-k shards + a manifest (resumable)."""
    check_environment()
    from shared.prompt import TemplateError
    from teacher_dump.inputs import InputError
    from teacher_dump.run import DumpConfig, dump_teacher

    if model.suffix == ".gguf":
        model = require_model(model, "--model")
    cfg = DumpConfig(
        model=model, out=out, mimic_data=mimic_data, pref_data=pref_data, image_root=image_root, shards=shards,
        top_k=top_k, encoding=encoding, sample=sample, sample_seed=sample_seed, backend=backend, dtype=dtype,
        max_model_len=max_model_len, max_images=max_images, address=address, workers=workers,
        force=force, skip_invalid=skip_invalid, tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, dry_run=dry_run, vllm_scoring=vllm_scoring, verbose=verbose,
    )
    try:
        dump_teacher(cfg)
    except (InputError, TemplateError, FileNotFoundError) as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e.filename}: {e.strerror}; choose an --out you can write to")
    if dry_run:
        return  # the plan is printed; nothing was written
    from shared.shards import dump_info

    typer.echo(json.dumps(dump_info(out), indent=2))


@app.command("generate")
def generate_cmd(
    model: Path = typer.Option(..., help="The model that answers (a teacher, a student; a directory or .gguf)."),
    data: Path = typer.Option(..., help="Records or prompts: any input dump-teacher reads (conversations: the last "
                              "answer is replaced or added; or question/prompt strings)."),
    out: Path = typer.Option(..., help="JSONL of mimic records with provenance (resumable)."),
    image_root: Path | None = typer.Option(None, help="Root of image paths (default: the data file's directory)."),
    backend: str = typer.Option("vllm", help="vllm | hf"),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0: sampling at this temperature."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling's share of the mass (with --temperature > 0)."),
    max_new_tokens: int = typer.Option(256, help="Longest answer, end-of-turn token included."),
    seed: int = typer.Option(0, help="Sampling seed (each record's own seed comes from it and the record's id)."),
    batch_size: int = typer.Option(16, help="Records per batch (and per resumable step)."),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    max_model_len: int = typer.Option(2048, help="Longest prompt + answer."),
) -> None:
    """Answer every record with MODEL: the teacher's answers (sequence-level distillation data) or a
    student's samples (on-policy rounds), written as mimic records that dump-teacher reads. The
    engine's own output goes to OUT.engine.log."""
    check_environment()
    from tqdm import tqdm

    from shared.models import ModelError
    from teacher_dump.backends import Sampling
    from teacher_dump.generate import GenerateConfig, generate
    from teacher_dump.inputs import InputError

    model = require_model(model, "--model")
    cfg = GenerateConfig(model=model, data=data, out=out, image_root=image_root, backend=backend,
                         sampling=Sampling(temperature, top_p, max_new_tokens), seed=seed, batch_size=batch_size,
                         dtype=dtype, max_model_len=max_model_len)
    bars: list[tqdm] = []  # made at the first finished batch: a refusal prints one line only

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(desc="generate", unit="record", total=total, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        summary = generate(cfg, progress)
    except (InputError, ModelError) as e:
        fail(str(e))
    except PermissionError as e:
        fail(f"{e.filename}: {e.strerror}; choose an --out you can write to (what is written is kept: a rerun "
             "continues it)")
    finally:
        for bar in bars:
            bar.close()
    typer.echo(json.dumps(summary))


@shards_app.command("verify")
def shards_verify(out: Path = typer.Argument(..., metavar="DUMP", help="A dump directory.")) -> None:
    """Check every shard's checksum, schema and row count against the manifest."""
    from shared.shards import verify_dump

    try:
        problems = verify_dump(out)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    for p in problems:
        typer.secho(f"BAD {p}", err=True, fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"{out}: all shards verified")


@shards_app.command("info")
def shards_info(
    out: Path = typer.Argument(..., metavar="DUMP", help="A dump directory."),
    student: Path | None = typer.Option(None, help="A student model: how much of the dump reaches it (its "
                                        "tokenizer may differ from the teacher's)."),
) -> None:
    """Rows, tokens, bytes per token, k and teacher of a dump (and what of it reaches --student)."""
    from shared.shards import dump_info

    try:
        info = dump_info(out)
        if student is not None:
            require_model(student, "--student")
            from student_train.data import student_coverage

            info["student"] = student_coverage(out, student)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    typer.echo(json.dumps(info, indent=2))


student_app = typer.Typer(no_args_is_help=True, help="Student models.")
app.add_typer(student_app, name="student")
model_app = typer.Typer(no_args_is_help=True, help="Model files.")
app.add_typer(model_app, name="model")


@model_app.command("from-gguf")
def model_from_gguf(
    gguf: Path = typer.Argument(..., help="A GGUF checkpoint (llama.cpp's format)."),
    out: Path = typer.Option(..., help="Where to write the transformers directory."),
) -> None:
    """Convert a GGUF checkpoint into a transformers directory (float32 safetensors, tokenizer, chat
    template) that every lmod command and vLLM read. `--model FILE.gguf` does this once by itself."""
    from shared.models import ModelError, from_gguf

    try:
        written = from_gguf(gguf, out)
    except ModelError as e:
        fail(str(e))
    typer.echo(str(written))


@student_app.command("make-tiny")
def student_make_tiny(
    teacher: Path = typer.Option(..., help="Teacher directory (its tokenizer and processor are reused)."),
    out: Path = typer.Option(..., help="Where to write the MoE student (and OUT-dense, the dense one)."),
    num_experts: int = typer.Option(4),
    top_k: int = typer.Option(2, "--experts-per-token", "--top-k",
                              help="Experts each token is routed to (--top-k is the same option)."),
    moe_layers: str = typer.Option("every-other", help="every-other | all | comma-separated layer indices."),
    noise: float = typer.Option(0.0, min=0.0, help="Relative noise added to each expert copy."),
    fresh_vision: bool = typer.Option(False, help="A smaller random vision tower instead of the teacher's "
                                      "(LLaVA-MoD's student starts from the teacher's tower and keeps it frozen)."),
    seed: int = typer.Option(0),
) -> None:
    """Build the tiny dense student (the teacher's vision tower, and its projector where the widths
    match; a random text model), then upcycle it (the same code as `lmod student upcycle`)."""
    check_environment()
    from student_train.moe import make_dense_student

    if (out / "config.json").exists():
        fail(f"{out} already holds a model; choose another --out")
    require_model(teacher, "--teacher")
    dense = out.with_name(out.name + "-dense")
    try:
        origin = make_dense_student(teacher, dense, seed=seed, vision="fresh" if fresh_vision else "teacher")
    except ValueError as e:
        fail(str(e))
    typer.echo("dense student: " + ", ".join(f"{part} {where}" for part, where in origin.items()))
    _upcycle(dense, out, num_experts, top_k, moe_layers, noise, seed)


@student_app.command("from-teacher")
def student_from_teacher(
    teacher: Path = typer.Option(..., help="Teacher: a model directory or a .gguf file."),
    layers: int = typer.Option(..., min=1, help="Text-model layers to keep (the teacher's first N)."),
    out: Path = typer.Option(..., help="Where to write the MoE student (and OUT-dense, the dense cut)."),
    dense: bool = typer.Option(False, help="Write only the dense cut, at OUT (no upcycling)."),
    num_experts: int = typer.Option(4),
    top_k: int = typer.Option(2, "--experts-per-token", "--top-k",
                              help="Experts each token is routed to (--top-k is the same option)."),
    moe_layers: str = typer.Option("every-other", help="every-other | all | comma-separated layer indices."),
    noise: float = typer.Option(0.0, min=0.0, help="Relative noise added to each expert copy."),
    seed: int = typer.Option(0),
) -> None:
    """A student cut from the teacher (its first N layers, embeddings, head, vision tower: the
    layer-dropping start of DistilBERT and Minitron), then upcycled into an MoE (`lmod student upcycle`)."""
    check_environment()
    from student_train.moe import first_layers

    teacher = require_model(teacher, "--teacher")
    if (out / "config.json").exists():
        fail(f"{out} already holds a model; choose another --out")
    cut = out if dense else out.with_name(out.name + "-dense")
    if (cut / "config.json").exists():
        fail(f"{cut} already holds a model; choose another --out")
    try:
        facts = first_layers(teacher, cut, layers)
    except ValueError as e:
        fail(str(e))
    typer.echo(json.dumps({"dense_student": str(cut), **facts}))
    if not dense:
        _upcycle(cut, out, num_experts, top_k, moe_layers, noise, seed)


@student_app.command("upcycle")
def student_upcycle(
    base: Path = typer.Option(..., help="A dense model directory (transformers format, multimodal or text-only), "
                              "e.g. SmolVLM-256M or SmolLM2-135M-Instruct."),
    out: Path = typer.Option(..., help="Where to write the MoE student."),
    num_experts: int = typer.Option(4),
    top_k: int = typer.Option(2, "--experts-per-token", "--top-k",
                              help="Experts each token is routed to (--top-k is the same option)."),
    moe_layers: str = typer.Option("every-other", help="every-other | all | comma-separated layer indices."),
    noise: float = typer.Option(0.0, min=0.0,
                                help="Relative noise added to each expert copy (0: equals the dense model)."),
    seed: int = typer.Option(0),
) -> None:
    """Sparse upcycling: the text model's FFNs become experts of its MoE counterpart (Qwen2 -> Qwen2-MoE,
    Qwen3 -> Qwen3-MoE, Qwen3-VL -> Qwen3-VL-MoE, Llama/Mistral -> Mixtral or Qwen2-MoE's layout)."""
    check_environment()
    base = require_model(base, "--base")
    if (out / "config.json").exists():
        fail(f"{out} already holds a model; choose another --out")
    _upcycle(base, out, num_experts, top_k, moe_layers, noise, seed)


def _upcycle(base: Path, out: Path, num_experts: int, top_k: int, moe_layers: str, noise: float, seed: int) -> None:
    from student_train.moe import VLLM_SERVES_MOE, upcycle

    try:
        layers = upcycle(base, out, num_experts=num_experts, top_k=top_k, moe_layers=moe_layers, noise=noise,
                         seed=seed)
    except ValueError as e:
        fail(str(e))
    model_type = json.loads((out / "config.json").read_text())["model_type"]
    typer.echo(json.dumps({"student": str(out), "base": str(base), "moe_layers": layers,
                           "vllm_serves_it": VLLM_SERVES_MOE.get(model_type, "unknown for this family")}))


@app.command("train")
def train_cmd(
    stage: str = typer.Option(..., help="mimic | pref"),
    shards: list[Path] = typer.Option(..., "--dump", "--shards", help="A teacher dump directory (repeat for "
                                      "several; --shards is the same option)."),
    student: Path = typer.Option(..., help="Student to start from (upcycled MoE or a checkpoint)."),
    out: Path = typer.Option(..., help="Checkpoint + metrics.jsonl directory."),
    config: Path | None = typer.Option(None, help="YAML of TrainConfig fields (see pipelines/configs)."),
    image_root: Path | None = typer.Option(None, help="Root of the shards' image paths."),
    resume: bool = typer.Option(False, help="Continue from OUT's checkpoint."),
    allow_partial: bool = typer.Option(False, help="Train on a dump whose shards are not all finished."),
    stop_after: int | None = typer.Option(None, min=1, help="End this run after N more steps, at a checkpoint "
                                          "(time-boxed or preemptible jobs); --resume continues it."),
    seed: int | None = typer.Option(None, help="Data order and initialisation (default: the config's, else 0)."),
    steps: int | None = typer.Option(None, help="Optimizer steps (default: the config's, else 200)."),
    kd: str | None = typer.Option(None, help="topk | sampled (RS-KD on a dump made with --sample); default topk"),
    kd_tail: str | None = typer.Option(None, help="renorm | rest (default rest)"),
    pref_loss: str | None = typer.Option(None, help="dpo | ipo | kto_pair (default dpo)"),
    beta: float | None = typer.Option(None, help="Preference loss strength (default: the config's, else 0.1)."),
    dry_run: bool = typer.Option(False, help="Print the per-rank memory plan (JSON: weights, grads, optimizer, "
                                 "activations, head_chunk, total) and exit without training."),
    gpu_memory: float | None = typer.Option(None, min=0.1, help="With --dry-run: GiB per GPU; says whether the "
                                            "config fits and the largest micro-batch (batch_size) that does."),
    ranks: int | None = typer.Option(None, min=1, help="With --dry-run: the ranks the run will have (default: "
                                     "WORLD_SIZE, else 1)."),
) -> None:
    """Train the student from teacher shards (no teacher in memory)."""
    check_environment()
    from shared.manifest import ManifestError
    from shared.prompt import TemplateError
    from student_train.data import ShardError
    from student_train.train import TrainError, train

    cfg = _train_config(config, stage=stage, seed=seed, steps=steps, kd=kd, kd_tail=kd_tail, pref_loss=pref_loss,
                        beta=beta)
    student = require_model(student, "--student")
    if dry_run:
        from student_train.memory_plan import dry_run as plan_run

        try:
            report = plan_run(shards, student, cfg, image_root, ranks or int(os.environ.get("WORLD_SIZE", "1")),
                              gpu_memory)
        except (ShardError, ValueError) as e:
            fail(str(e))
        typer.echo(json.dumps(report, indent=1))
        return
    try:
        history = train(shards, student, out, cfg, image_root=image_root, resume=resume, allow_partial=allow_partial,
                        stop_after=stop_after)
    except (ShardError, TrainError, TemplateError, FileNotFoundError, ManifestError) as e:
        fail(str(e))
    except OSError as e:  # a read-only or full disk: checkpoints written so far stay and resume exactly
        fail(f"{e.filename or out}: {e.strerror or e}; free space or choose an --out you can write to (a run that "
             "saved a checkpoint continues with --resume)")
    if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per rank
        typer.echo(json.dumps(history[-1] if history else {}))


def _train_config(config: Path | None, **overrides: Any) -> Any:
    """The TrainConfig of --config (if any) and the flags given, or one line saying what is wrong."""
    from student_train.config import TrainConfig

    try:
        if config is not None:
            return TrainConfig.from_yaml(config, **overrides)
        return TrainConfig(**{k: v for k, v in overrides.items() if v is not None})
    except (ValueError, OSError) as e:
        fail(f"config: {e}")


@app.command("sweep")
def sweep_cmd(
    stage: str = typer.Option(..., help="mimic | pref"),
    shards: list[Path] = typer.Option(..., "--dump", "--shards", help="A teacher dump directory (repeat for "
                                      "several), as in `lmod train`."),
    student: list[Path] = typer.Option(..., help="Student every trial starts from (repeat to sweep students: "
                                       "MoE vs dense; the first is the base)."),
    out: Path = typer.Option(..., help="Sweep directory: trials/, results.csv, summary.md (a rerun resumes it)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=V1,V2", help="A TrainConfig key and the values to "
                                   "try (repeat for several keys: their cross product is swept)."),
    seeds: list[int] = typer.Option([0], "--seeds", metavar="S [S ...]", help="Seeds of every configuration "
                                    "(data order and initialisation)."),
    eval_data: Path | None = typer.Option(None, help="Eval JSONL scored after each trial, as `lmod eval --data`."),
    eval_image_root: Path | None = typer.Option(None, help="Root of the eval data's images (default: its folder)."),
    held_out: list[Path] | None = typer.Option(None, "--held-out-dump", help="A teacher dump of held-out data: "
                                               "adds kl_to_teacher and agreement, as `lmod eval --dump`."),
    held_out_image_root: Path | None = typer.Option(None, help="Root of the held-out dump's image paths."),
    config: Path | None = typer.Option(None, help="YAML of TrainConfig fields: the base every trial changes."),
    image_root: Path | None = typer.Option(None, help="Root of the dump's image paths (default: where the "
                                           "teacher read them)."),
    allow_partial: bool = typer.Option(False, help="Train on a dump whose shards are not all finished."),
    steps: int | None = typer.Option(None, help="Optimizer steps of every trial (default: the config's)."),
    kd: str | None = typer.Option(None, help="topk | sampled"),
    kd_tail: str | None = typer.Option(None, help="renorm | rest"),
    pref_loss: str | None = typer.Option(None, help="dpo | ipo | kto_pair"),
    beta: float | None = typer.Option(None, help="Preference loss strength."),
    address: str | None = typer.Option(None, help="A running Ray cluster (HOST:PORT or auto); default: a local "
                                       "one for this sweep."),
    cpus_per_trial: int | None = typer.Option(None, min=1, help="CPUs a trial holds (default: all of this "
                                              "machine's, or its share per GPU)."),
    gpus_per_trial: int | None = typer.Option(None, min=0, max=1, help="GPUs a trial holds (default: 1 where "
                                              "there is a GPU, else 0)."),
) -> None:
    """Train and evaluate every combination of --set values x --seeds from one dump (Ray Tune);
    writes OUT/results.csv and OUT/summary.md. Rerun the same command to resume."""
    check_environment()
    from dataclasses import asdict

    from pipelines.sweep import STUDENT, SweepError, SweepSpec, parse_grid, run_sweep
    from shared.evaluation import EvalDataError
    from shared.manifest import ManifestError
    from student_train.data import ShardError

    base = _train_config(config, stage=stage, steps=steps, kd=kd, kd_tail=kd_tail, pref_loss=pref_loss, beta=beta)
    students = [require_model(s, "--student").resolve() for s in student]
    if len(set(students)) < len(students):
        fail("--student: a directory is given twice")
    try:
        grid = parse_grid(set_)
    except SweepError as e:
        fail(str(e))
    if len(students) > 1:
        grid = {STUDENT: [str(s) for s in students], **grid}
    if len(set(seeds)) < len(seeds):
        fail(f"--seeds {' '.join(map(str, seeds))}: a seed is listed twice")
    if eval_data is None and not held_out:
        fail("give --eval-data (questions with answers) and/or --held-out-dump: a sweep compares evaluated trials")
    import torch

    gpus = gpus_per_trial if gpus_per_trial is not None else int(torch.cuda.is_available())
    cpus = cpus_per_trial or max(1, (os.cpu_count() or 1) // max(1, torch.cuda.device_count() if gpus else 1))
    fields = asdict(base)
    fields.pop("seed")
    spec = SweepSpec(stage=base.stage, dumps=[str(d.resolve()) for d in shards], student=str(students[0]),
                     base=fields, grid=grid, seeds=list(seeds),
                     image_root=str(image_root.resolve()) if image_root else None,
                     eval_data=str(eval_data.resolve()) if eval_data else None,
                     eval_image_root=str(eval_image_root.resolve()) if eval_image_root else None,
                     held_out=[str(d.resolve()) for d in held_out or []],
                     held_out_image_root=str(held_out_image_root.resolve()) if held_out_image_root else None,
                     allow_partial=allow_partial, cpus_per_trial=cpus, gpus_per_trial=gpus)
    try:
        outcome = run_sweep(spec, out, address=address)
    except (SweepError, ShardError, ManifestError, EvalDataError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"{e.filename or out}: {e.strerror or e}; free space or choose an --out you can write to (finished "
             "trials are kept: rerun the same command)")
    typer.echo(f"{out / 'results.csv'}\n{out / 'summary.md'}")
    if outcome.failed:
        names = ", ".join(r["trial"] for r in outcome.failed[:3])
        fail(f"{len(outcome.failed)} of {len(outcome.rows)} trials did not finish ({names}); their errors are in "
             f"{out / 'summary.md'}; rerun the same command to retry them", code=1)


@app.command("onpolicy")
def onpolicy_cmd(
    teacher: Path = typer.Option(..., help="The teacher that scores the student's samples."),
    student: Path = typer.Option(..., help="The student of round 1 (later rounds start from the previous one)."),
    data: Path = typer.Option(..., help="Prompts (and images): any input dump-teacher reads; the answers are the "
                              "student's."),
    rounds: int = typer.Option(..., min=1, help="Rounds of generate -> dump -> train."),
    out: Path = typer.Option(..., help="OUT/round-N/{samples.jsonl,dump,student} (a rerun resumes)."),
    config: Path | None = typer.Option(None, help="YAML of TrainConfig fields (a mimic config) for every round."),
    steps: int | None = typer.Option(None, help="Training steps per round (default: the config's)."),
    image_root: Path | None = typer.Option(None, help="Root of the prompts' images (default: the data's folder)."),
    backend: str = typer.Option("vllm", help="The teacher's dump: vllm | hf; generation uses vLLM where it loads "
                                "the student, else transformers."),
    generate_backend: str | None = typer.Option(None, help="Force the student's generation backend: vllm | hf."),
    temperature: float = typer.Option(1.0, help="The student's sampling temperature."),
    top_p: float = typer.Option(1.0),
    max_new_tokens: int = typer.Option(64, help="Longest sampled answer."),
    top_k: int = typer.Option(32, help="Teacher log-probs stored per sampled token."),
    sample: int = typer.Option(0, help="RS-KD draws per token as well (for kd: sampled)."),
    shards: int = typer.Option(1, help="Shards of each round's dump."),
    seed: int = typer.Option(0, help="Sampling seed (each round its own, from this)."),
    max_model_len: int | None = typer.Option(None, help="Longest prompt + answer (default: the shorter of the "
                                             "two models' positions, at most 2,048)."),
    offpolicy_dump: list[Path] | None = typer.Option(None, help="An off-policy dump trained beside each round's "
                                                     "(its rows mixed in, in proportion to their number unless "
                                                     "--onpolicy-fraction)."),
    onpolicy_fraction: float | None = typer.Option(None, help="GKD's lambda: the share of every batch from the "
                                                   "round's samples, the rest from --offpolicy-dump."),
    prompts_per_round: int | None = typer.Option(None, min=1, help="Each round on the next N records of a JSONL "
                                                 "--data (wrapping around) instead of all of them."),
) -> None:
    """On-policy distillation in rounds: the student samples, the teacher scores exactly those tokens
    in one dump, the student trains on them; the teacher and the student are never up together."""
    check_environment()
    from pipelines.onpolicy import OnPolicyConfig, OnPolicyError, run_onpolicy
    from shared.manifest import ManifestError
    from shared.models import ModelError
    from student_train.data import ShardError
    from student_train.train import TrainError
    from teacher_dump.inputs import InputError

    cfg = _train_config(config, stage="mimic", steps=steps)
    teacher = require_model(teacher, "--teacher")
    student = require_model(student, "--student")
    run = OnPolicyConfig(teacher=teacher.resolve(), student=student.resolve(), data=data.resolve(), out=out,
                         rounds=rounds, train=cfg, image_root=image_root.resolve() if image_root else None,
                         backend=backend, generate_backend=generate_backend, temperature=temperature, top_p=top_p,
                         max_new_tokens=max_new_tokens, top_k=top_k, sample=sample, shards=shards, seed=seed,
                         max_model_len=max_model_len, offpolicy=[d.resolve() for d in offpolicy_dump or []],
                         prompts_per_round=prompts_per_round, onpolicy_fraction=onpolicy_fraction)
    try:
        summaries = run_onpolicy(run)
    except (OnPolicyError, InputError, ShardError, TrainError, ManifestError, ModelError) as e:
        fail(str(e))
    typer.echo(json.dumps(summaries))


@app.command("eval")
def eval_cmd(
    model: Path = typer.Option(..., help="Model directory (or .gguf)."),
    data: Path | None = typer.Option(None, help="Eval JSONL (id, question, answer, optional image and type); "
                                     "optional with --shards."),
    out: Path | None = typer.Option(None, help="Write metrics JSON here."),
    image_root: Path | None = typer.Option(None),
    shards: list[Path] | None = typer.Option(None, "--dump", "--shards", help="Teacher dumps of held-out data: "
                                             "adds kl_to_teacher and agreement (--shards is the same option)."),
    shards_image_root: Path | None = typer.Option(None, "--dump-image-root", "--shards-image-root",
                                                  help="Root of those dumps' image paths."),
    device: str = typer.Option("auto", help="auto (the first GPU if any) | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("float32", help="Weights during evaluation: float32 | bfloat16 | float16."),
    batch_size: int = typer.Option(64, min=1, help="Questions answered per batch (greedy, left-padded)."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file (never one this command reads)."),
) -> None:
    """Held-out accuracy by type, POPE-style hallucination metrics, expert utilisation; with --shards
    (a teacher dump of held-out data) the KL to the teacher and agreement with its next token."""
    check_environment()
    from shared.evaluation import EvalDataError, evaluate_model
    from shared.manifest import ManifestError
    from shared.models import ModelError

    if data is None and not shards:
        fail("nothing to evaluate: give --data (questions with answers) and/or --shards (a held-out teacher dump)")
    model = require_model(model, "--model")
    if out is not None:
        _check_eval_out(out, [model, *([data] if data else []), *(shards or [])], overwrite)
    try:
        from shared.models import DEVICES

        if not re.fullmatch(DEVICES, device):
            fail(f"--device {device!r}; use auto | cpu | cuda | cuda:N")
        if device != "auto" and device.startswith("cuda") and not __import__("torch").cuda.is_available():
            fail(f"--device {device}: no GPU is visible here; use --device cpu (or auto)")
        if dtype not in ("float32", "bfloat16", "float16"):
            fail(f"--dtype {dtype!r}; use float32 | bfloat16 | float16")
        # every line is checked before the model loads
        metrics = evaluate_model(model, data, image_root, device=device, dtype=dtype, batch_size=batch_size,
                                 progress=True) if data is not None else {}
    except (EvalDataError, ModelError) as e:
        fail(str(e))
    if shards:
        from student_train.data import ShardError
        from student_train.evaluate import held_out_agreement

        try:  # images default to where the teacher read them (recorded in the dumps)
            metrics.update(held_out_agreement(model, shards, shards_image_root, device=device, dtype=dtype))
        except (ShardError, ManifestError, ModelError) as e:  # the dumps' images: under --dump-image-root here
            fail(str(e).replace("--image-root", "--dump-image-root"))
    text = json.dumps(metrics, indent=2)
    if out is not None:
        from shared.manifest import atomic_write_bytes

        try:
            atomic_write_bytes(out, (text + "\n").encode())
        except OSError as e:
            typer.echo(text)
            fail(f"{out}: cannot be written ({e.strerror or e}); the metrics are on stdout above", code=1)
    typer.echo(text)


def _check_eval_out(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """--out is a new file (or, with --overwrite, an old one), never a directory or anything the
    evaluation reads; checked before the model loads."""
    target = out.resolve()
    for path in inputs:
        p = Path(path).resolve()
        if target == p or p in target.parents:
            fail(f"--out {out} is {'inside ' if target != p else ''}{path}, which this evaluation reads; "
                 "write the metrics elsewhere")
    if out.is_dir():
        fail(f"--out {out} is a directory; give a file name (e.g. {out / 'eval.json'})")
    if not out.parent.is_dir():
        fail(f"{out.parent}: no such directory for --out")
    if out.exists() and not overwrite:
        fail(f"--out {out} exists (nothing was changed); pass --overwrite to replace it or choose another name")


@app.command("report")
def report_cmd(
    run_dir: Path = typer.Argument(..., metavar="RUN", help="A training OUT (metrics.jsonl), a sweep "
                                   "(sweep.json) or a demo directory (report.json)."),
    tensorboard: bool = typer.Option(False, help="Also write TensorBoard event files (needs `tensorboard`)."),
) -> None:
    """PNG plots: training curves (loss, KL or DPO loss and accuracy, expert load per layer), a sweep's
    bars and curves, the demo table."""
    from pipelines.report import read_metrics, report

    try:
        written = report(run_dir)
    except ValueError as e:
        fail(str(e))
    if tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            fail("--tensorboard needs the `tensorboard` package: pip install tensorboard")
        for metrics in sorted([run_dir / "metrics.jsonl", *run_dir.glob("*/metrics.jsonl")]):
            if metrics.is_file():
                with SummaryWriter(str(metrics.parent / "tensorboard")) as writer:
                    for row in read_metrics(metrics):
                        for key, value in row.items():
                            if isinstance(value, (int, float)) and key != "step":
                                writer.add_scalar(key, value, row["step"])
    for path in written:
        typer.echo(str(path))


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Where the demo writes everything (resumable)."),
    n_mimic: int = typer.Option(8000),
    n_pref: int = typer.Option(1000),
    n_eval: int = typer.Option(400),
    teacher_steps: int = typer.Option(1800),
    teacher_tries: int = typer.Option(2, help="Teachers trained (other initialisations) until one meets the "
                                      "bar on the validation split; the best is kept."),
    shards: int = typer.Option(4),
    top_k: int = typer.Option(32),
    backend: str = typer.Option("vllm"),
    student_steps: int = typer.Option(1500, help="Steps of the SFT and mimic students (same budget)."),
    pref_steps: int = typer.Option(300, help="Preference-distillation steps after mimic."),
    seed: int = typer.Option(0, help="Seed of the training world, the teacher and the students."),
    eval_seed: int = typer.Option(1, help="Seed of the held-out question world (the held-out conversations: "
                                  "+1); both must differ from --seed."),
) -> None:
    """The tiny end-to-end demo on the embedded world; writes OUT/report.json."""
    check_environment()
    from pipelines.demo import DemoConfig, run_demo

    try:
        cfg = DemoConfig(out=out, n_mimic=n_mimic, n_pref=n_pref, n_eval=n_eval, teacher_steps=teacher_steps,
                         teacher_tries=teacher_tries, shards=shards, top_k=top_k, backend=backend,
                         student_steps=student_steps, pref_steps=pref_steps, seed=seed, eval_seed=eval_seed)
    except ValueError as e:
        fail(str(e))
    run_demo(cfg)


def _spread_seeds(argv: list[str]) -> list[str]:
    """`--seeds 0 1 2` (the documented form) as typer's `--seeds 0 --seeds 1 --seeds 2`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--seeds":
            i += 1
            values = []
            while i < len(argv) and re.fullmatch(r"-?\d+(,-?\d+)*", argv[i]):
                values += argv[i].split(",")
                i += 1
            out[-1:] = [x for v in values for x in ("--seeds", v)] or ["--seeds"]
            continue
        i += 1
    return out


def main() -> None:
    app(args=_spread_seeds(sys.argv[1:]), prog_name="lmod")


if __name__ == "__main__":
    sys.exit(main())
