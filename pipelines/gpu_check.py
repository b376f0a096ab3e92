"""The GPU-only paths, checked the day a GPU is lent (`bash pipelines/gpu_check.sh`; CI does not run
it). On the tiny world, in a few minutes, with every GPU of the machine:

1. a teacher dump on the GPU (vLLM when it imports, else the transformers backend; says which);
2. `torchrun` bf16 mimic and pref training, one rank per GPU, each killed (SIGKILL) after its first
   checkpoint and resumed: the resumed run ends where an uninterrupted one does, and its per-step
   losses equal a CPU float32 run of the same steps within bf16 tolerance;
3. `lmod eval --device cuda`: float32 answers equal the CPU's; bf16 metrics are printed;
4. the peak GPU memory of one mimic step at V = 151,936 (vocabulary padded), logits vs fused head;
5. the memory plan (`lmod train --dry-run`) against the measured peak of bf16 FSDP2 steps (one GPU's
   group) with activation checkpointing of a Qwen3-VL-2B-shaped MoE student (random weights, config only) at the GPU
   recipe's per-rank shape (8 rows of 4,096 tokens, and 4 rows: the difference within 30%), with
   the experts' matmuls recorded in bf16;
6. a short `lmod demo` on the GPU (deterministic algorithms need cuBLAS's fixed workspace).

Prints one JSON summary; exits non-zero at the first check that fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
LMOD = [sys.executable, "-m", "pipelines.cli"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise SystemExit(f"gpu_check: {' '.join(cmd[:6])} ... failed:\n{res.stderr[-3000:]}")
    return res


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _torchrun(gpus: int, port: int, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port", str(port),
            "-m", "pipelines.cli", *args]


def _killed_then_resumed(cmd: list[str], out: Path) -> None:
    """Start `cmd`, SIGKILL its process group once OUT has a checkpoint, then rerun with --resume."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (out / "latest_checkpoint").exists():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"gpu_check: no checkpoint before the kill:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _run([*cmd, "--resume"], timeout=600)


def check_training(stage: str, shards: Path, student: Path, world: Path, tmp: Path, gpus: int) -> dict:
    cfg = tmp / f"{stage}.yaml"
    lr = "0.002" if stage == "mimic" else "0.0002"
    base = f"stage: {stage}\nsteps: 6\nbatch_size: {4 * gpus}\nlr: {lr}\nwarmup: 1\naux_loss_coef: 0.0\nsave_every: 3\n"
    cfg.write_text(base + "dtype: bfloat16\ndevice: cuda\ntrain: [all]\n")
    (tmp / f"{stage}_cpu.yaml").write_text(base + "dtype: float32\ndevice: cpu\ntrain: [all]\n")
    args = ["train", "--stage", stage, "--shards", str(shards), "--student", str(student), "--image-root", str(world)]
    _run([*LMOD, *args, "--out", str(tmp / f"{stage}_cpu"), "--config", str(tmp / f"{stage}_cpu.yaml")], timeout=600)
    _run(_torchrun(gpus, 29611, [*args, "--out", str(tmp / f"{stage}_gpu"), "--config", str(cfg)]), timeout=600)
    _killed_then_resumed(_torchrun(gpus, 29612, [*args, "--out", str(tmp / f"{stage}_resumed"), "--config",
                                                 str(cfg)]), tmp / f"{stage}_resumed")
    cpu, gpu, resumed = (_losses(tmp / f"{stage}_{k}") for k in ("cpu", "gpu", "resumed"))
    for a, b in zip(cpu, gpu, strict=True):
        assert abs(a - b) <= 0.03 * abs(a) + 0.01, (stage, "bf16 GPU vs CPU float32 losses", cpu, gpu)
    for a, b in zip(gpu, resumed, strict=True):
        assert abs(a - b) <= 1e-3 * abs(a) + 1e-4, (stage, "killed and resumed vs uninterrupted", gpu, resumed)
    return {"cpu_float32": cpu, "gpu_bf16": gpu, "gpu_bf16_resumed": resumed}


def peak_step_memory(student: Path, vocab_rows: int = 151_936, rows: int = 8, length: int = 2048) -> dict:
    from transformers import AutoModelForImageTextToText

    from shared.mllm import FinalHidden
    from student_train.data import MimicBatch
    from student_train.losses import mimic_token_losses
    from student_train.train import TrainConfig, mimic_terms

    out = {}
    for mode in ("logits", "fused"):
        model = AutoModelForImageTextToText.from_pretrained(str(student), dtype=torch.float32).cuda()
        vocab = model.config.text_config.vocab_size
        model.resize_token_embeddings(vocab_rows, mean_resizing=False)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (rows, length), generator=gen)
        response = 128
        cols = torch.arange(length - response - 1, length - 1).repeat(rows)
        index = torch.arange(rows).repeat_interleave(response)
        top = torch.randn(index.numel(), 256, generator=gen).log_softmax(-1).topk(64, -1)
        batch = MimicBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, index, cols, top.indices,
                           top.values, (1 - top.values.double().exp().sum(-1)).clamp(min=0).float()).to("cuda")
        cfg = TrainConfig(dtype="bfloat16")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                if mode == "fused":
                    loss = mimic_terms(model, batch, cfg, FinalHidden.of(model), vocab)["objective"]
                else:
                    logits = model(**batch.inputs).logits[batch.rows, batch.cols, :vocab]
                    targets = batch.inputs["input_ids"][batch.rows, batch.cols + 1]
                    loss = mimic_token_losses(logits, batch.topk_ids, batch.topk_logprobs, batch.rest_mass, targets,
                                              1.0, 0.0)[:, 0].sum()
            loss.backward()
            torch.cuda.synchronize()
            out[mode] = {"peak_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20), "loss": float(loss)}
        except torch.OutOfMemoryError:
            out[mode] = {"peak_mb": None, "loss": None, "error": "out of memory"}
        del model, batch
        torch.cuda.empty_cache()
    return {"vocab": vocab_rows, "rows": rows, "tokens_per_row": length, **out}


def plan_against_gpu(rows: tuple[int, int] = (4, 8), length: int = 4096) -> dict:
    """Predicted vs measured (torch.cuda.max_memory_allocated) step memory, bf16 + checkpointing."""
    from pipelines.benchmarks.bench_memory_plan import qwen3_vl_2b_moe
    from shared.mllm import FinalHidden
    from shared.models import model_from_config
    from student_train.data import MimicBatch
    from student_train.memory_plan import plan_memory
    from student_train.objectives import mimic_terms
    from student_train.parts import apply_trainable
    from student_train.train import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        student = qwen3_vl_2b_moe(Path(tmp))
        import torch.distributed as td
        from transformers import AutoConfig

        from student_train.train import shard_model

        if not td.is_initialized():  # FSDP2 as training runs it, on a group of this one GPU
            td.init_process_group("nccl", store=td.HashStore(), rank=0, world_size=1)
        model = model_from_config(AutoConfig.from_pretrained(tmp), torch.float32).cuda().train()
        apply_trainable(model, ["experts", "router"], "gpu check")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = shard_model(model, torch.bfloat16)  # bf16 all-gathers, float32 masters and reduce-scatter
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
        dtypes = set()
        for name, module in model.named_modules():
            if name.endswith("mlp.experts"):
                module.register_forward_hook(lambda m, a, out: dtypes.add(str(next(m.parameters()).dtype)))
        body, vocab = FinalHidden.of(model), 151_643
        measured, predicted, costs = [], [], None
        for n in rows:
            cfg = TrainConfig(dtype="bfloat16", activation_checkpointing=True, train=["experts", "router"],
                              batch_size=n)
            plan, costs = plan_memory(student, cfg, 1, length, costs)
            predicted.append(plan.total)
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, vocab, (n, length), generator=gen)
            cols = torch.arange(length - 257, length - 1).repeat(n)
            index = torch.arange(n).repeat_interleave(256)
            top = torch.randn(index.numel(), 128, generator=gen).log_softmax(-1).topk(32, -1)
            batch = MimicBatch({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, index, cols, top.indices,
                               top.values, (1 - top.values.double().exp().sum(-1)).clamp(min=0).float()).to("cuda")
            for _ in range(2):  # the second step runs with AdamW's moments allocated, as every later one
                torch.cuda.reset_peak_memory_stats()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = mimic_terms(model, batch, cfg, body, vocab)["objective"]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
            measured.append(torch.cuda.max_memory_allocated())
        del model, opt
        torch.cuda.empty_cache()
    d_pred, d_meas = predicted[1] - predicted[0], measured[1] - measured[0]
    assert dtypes == {"torch.bfloat16"}, ("expert weights seen by the kernels", dtypes)
    assert 0.7 <= d_pred / d_meas <= 1.3, ("plan vs measured difference", predicted, measured)
    gib = 1024**3
    return {"rows": list(rows), "tokens_per_row": length, "predicted_gib": [round(x / gib, 2) for x in predicted],
            "measured_peak_gib": [round(x / gib, 2) for x in measured], "difference_ratio": round(d_pred / d_meas, 3)}


def check_demo(tmp: Path) -> dict:
    """A short demo on the GPU: deterministic algorithms with cuBLAS (its workspace set by lmod)."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    res = _run([*LMOD, "demo", "--out", str(tmp / "demo"), "--n-mimic", "64", "--n-pref", "16", "--n-eval", "16",
                "--teacher-steps", "20", "--teacher-tries", "1", "--shards", "1", "--student-steps", "10",
                "--pref-steps", "4"], timeout=900, env=env)
    report = json.loads((tmp / "demo" / "report.json").read_text())
    return {"rows": [r["model"] for r in report["rows"]], "stderr_tail": res.stderr[-200:]}


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check: no GPU visible; this check is for a machine with one (CI does not run it)")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 answers compared with the CPU's
    gpus = torch.cuda.device_count()
    from pipelines.toy.tiny_teacher import make_tiny_teacher
    from pipelines.toy.world import make_world
    from student_train.moe import make_dense_student, upcycle

    summary: dict = {"gpus": gpus, "device": torch.cuda.get_device_name(0)}
    with tempfile.TemporaryDirectory(prefix="lmod-gpu-check-") as name:
        tmp = Path(name)
        world = tmp / "world"
        make_world(world, seed=3, n_mimic=64, n_pref=32, n_eval=16)
        make_tiny_teacher(world, tmp / "teacher", steps=200)
        try:
            import vllm  # noqa: F401

            backend = "vllm"
        except ImportError:
            backend = "hf"
        summary["dump_backend"] = backend
        _run([*LMOD, "dump-teacher", "--model", str(tmp / "teacher"), "--out", str(tmp / "shards"), "--mimic-data",
              str(world / "mimic.jsonl"), "--pref-data", str(world / "pref.jsonl"), "--shards", "4", "--top-k", "16",
              "--backend", backend, "--dtype", "bfloat16", "--max-model-len", "256"], timeout=900)
        make_dense_student(tmp / "teacher", tmp / "dense")
        upcycle(tmp / "dense", tmp / "student")
        summary["mimic"] = check_training("mimic", tmp / "shards", tmp / "student", world, tmp, gpus)
        summary["pref"] = check_training("pref", tmp / "shards", tmp / "mimic_gpu", world, tmp, gpus)
        evals = {}
        for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
            res = _run([*LMOD, "eval", "--model", str(tmp / "mimic_gpu"), "--data", str(world / "eval.jsonl"),
                        "--device", device, "--dtype", dtype], timeout=600)
            evals[f"{device}_{dtype}"] = json.loads(res.stdout)
        assert evals["cuda_float32"]["accuracy_by_type"] == evals["cpu_float32"]["accuracy_by_type"], evals
        summary["eval_accuracy"] = {k: v["accuracy"] for k, v in evals.items()}
        summary["step_memory"] = peak_step_memory(tmp / "student")
        summary["memory_plan"] = plan_against_gpu()
        summary["demo"] = check_demo(tmp)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
