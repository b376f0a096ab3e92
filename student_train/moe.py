"""The student: a small dense model (the tiny Idefics3 around a Qwen3 text model, or the first layers
of a teacher) and its sparse upcycling into the MoE counterpart of its text model, a standard
transformers class that loads with `AutoModelForImageTextToText` / `AutoModelForCausalLM`
`.from_pretrained` (no remote code).

Upcycling (LLaVA-MoD / MoE-LLaVA): every chosen layer's FFN becomes E experts that start as copies
of it, with a fresh router; with top-k weights renormalised to sum to 1 the upcycled model computes
exactly what the dense one did until training moves the experts apart.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.models import load_model, model_from_config

# What a model directory holds besides its processor, tokenizer and chat template files.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "lmod_recipe.json")


@dataclass
class StudentConfig:
    """The tiny dense student: smaller than the tiny teacher in both towers."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2  # head_dim 64
    text_intermediate: int = 384
    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 1
    vision_intermediate: int = 256


def copy_processor(src: Path, dst: Path) -> None:
    """Processor, tokenizer and chat template files (whatever the family keeps), not the weights."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in Path(src).iterdir():
        if path.is_file() and path.name not in _MODEL_FILES and path.suffix not in (".safetensors", ".bin", ".pt"):
            shutil.copy2(path, dst / path.name)


# Teacher families whose vision tower (and projector) the tiny Idefics3 student can take as they are.
_SHARED_TOWER_FAMILIES = ("idefics3",)


def make_dense_student(teacher_dir: Path, out: Path, cfg: StudentConfig | None = None, seed: int = 0,
                       vision: str = "teacher") -> dict[str, str]:
    """Dense student sharing the teacher's tokenizer and processor (same vocabulary), with a random
    text model. `vision="teacher"` (LLaVA-MoD's choice) starts it from the teacher's vision tower, and
    from its projector when the text widths match; `"fresh"` builds a smaller random tower from `cfg`.
    Returns which parts came from where."""
    from transformers import AutoConfig, Idefics3Config, Idefics3ForConditionalGeneration

    if vision not in ("teacher", "fresh"):
        raise ValueError(f"vision must be 'teacher' or 'fresh', not {vision!r}")
    cfg = cfg or StudentConfig()
    teacher_cfg = AutoConfig.from_pretrained(str(teacher_dir))
    tcfg = teacher_cfg.text_config
    if vision == "teacher":
        if teacher_cfg.model_type not in _SHARED_TOWER_FAMILIES:
            raise ValueError(f"the teacher in {teacher_dir} is {teacher_cfg.model_type}: its vision tower does not fit "
                             "the tiny Idefics3 student; build it with a fresh tower (--fresh-vision)")
        vision_config = teacher_cfg.vision_config.to_dict()
    else:
        vision_config = {
            "hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_intermediate,
            "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
            # The student reuses the teacher's processor, so its tower takes the teacher's image size.
            "image_size": teacher_cfg.vision_config.image_size, "patch_size": teacher_cfg.vision_config.patch_size,
        }
    config = Idefics3Config(
        vision_config=vision_config,
        text_config={
            "model_type": "qwen3", "vocab_size": tcfg.vocab_size, "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_intermediate, "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads, "num_key_value_heads": cfg.text_heads,
            "head_dim": cfg.text_hidden // cfg.text_heads, "max_position_embeddings": tcfg.max_position_embeddings,
            "pad_token_id": tcfg.pad_token_id, "eos_token_id": tcfg.eos_token_id, "bos_token_id": None,
            "tie_word_embeddings": False,
        },
        scale_factor=teacher_cfg.scale_factor,
        image_token_id=teacher_cfg.image_token_id,
        pad_token_id=tcfg.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    origin = {"vision": "fresh", "projector": "fresh", "language": "fresh"}
    if vision == "teacher":
        origin.update(_take_teacher_parts(model, Path(teacher_dir)))
    model.generation_config.eos_token_id = tcfg.eos_token_id
    model.generation_config.pad_token_id = tcfg.pad_token_id
    copy_processor(Path(teacher_dir), Path(out))
    model.save_pretrained(str(out))
    return origin


def _take_teacher_parts(model: torch.nn.Module, teacher_dir: Path) -> dict[str, str]:
    """Copy the teacher's vision tower into `model`, and its projector when the shapes match."""
    from safetensors import SafetensorError, safe_open

    own = model.state_dict()
    wanted = {"vision": "model.vision_model.", "projector": "model.connector."}
    found: dict[str, dict[str, torch.Tensor]] = {part: {} for part in wanted}
    for file in sorted(teacher_dir.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    for part, prefix in wanted.items():
                        if key.startswith(prefix):
                            found[part][key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: unreadable ({e}); the teacher's weights are damaged or partly written") from None
    if not found["vision"]:
        raise ValueError(f"no vision tower weights (model.vision_model.*) in {teacher_dir}/*.safetensors; "
                         "save the teacher with save_pretrained, or build the student with --fresh-vision")
    origin = {}
    for part, tensors in found.items():
        mine = {k for k in own if k.startswith(wanted[part])}
        fits = tensors.keys() == mine and all(tensors[k].shape == own[k].shape for k in mine)
        if part == "vision" and not fits:
            raise ValueError(f"the vision tower in {teacher_dir} does not match its config; "
                             "build the student with a fresh tower (--fresh-vision)")
        if fits:
            model.load_state_dict(tensors, strict=False)
            origin[part] = "teacher"
    return origin


@dataclass(frozen=True)
class MoECounterpart:
    """A transformers MoE text model that computes exactly what a dense one does when every expert
    is a copy of the dense FFN and the top-k weights are renormalised."""

    model_type: str
    experts_key: str  # config key holding the number of experts
    interleaved: bool  # dense layers may sit between MoE ones (mlp_only_layers)
    extra: tuple[tuple[str, Any], ...] = ()  # fixed config values that keep it exact


_QWEN2_MOE = MoECounterpart("qwen2_moe", "num_experts", True, (
    # The shared expert is kept (the class has one) but zeroed: it then adds nothing.
    ("shared_expert_intermediate_size", 1), ("norm_topk_prob", True), ("decoder_sparse_step", 1)))
_MIXTRAL = MoECounterpart("mixtral", "num_local_experts", False)  # renormalises top-k by construction

# Dense text model type -> its MoE counterparts, preferred first. Llama/Mistral take Mixtral when
# every layer is MoE, else Qwen2-MoE's layout (no q/k/v biases, zeroed shared expert); Qwen3-MoE
# would not do for them: its q/k norms change a Llama's attention.
MOE_COUNTERPARTS: dict[str, tuple[MoECounterpart, ...]] = {
    "qwen2": (_QWEN2_MOE,),
    "qwen3": (MoECounterpart("qwen3_moe", "num_experts", True,
                             (("norm_topk_prob", True), ("decoder_sparse_step", 1))),),
    "qwen3_vl_text": (MoECounterpart("qwen3_vl_moe_text", "num_experts", True, (("decoder_sparse_step", 1),)),),
    "llama": (_MIXTRAL, _QWEN2_MOE),
    "mistral": (_MIXTRAL, _QWEN2_MOE),
}
# Wrappers whose class is tied to the text model's kind (the others take any text config).
MOE_WRAPPERS = {"qwen3_vl": "qwen3_vl_moe"}
# Whether vLLM's wrapper of the family accepts the MoE text model (it serves the upcycled student).
VLLM_SERVES_MOE = {
    "idefics3": "no: vLLM's Idefics3 hard-codes a Llama text model",
    "smolvlm": "no: vLLM's SmolVLM is its Idefics3 (Llama text model)",
    "llava": "yes (vLLM's LLaVA takes any registered text model; GPU stack)",
    "llava_next": "yes (vLLM's LLaVA-NeXT takes any registered text model; GPU stack)",
    "qwen3_vl_moe": "yes: vLLM has Qwen3-VL-MoE (GPU stack)",
    "qwen2_moe": "yes: vLLM's Qwen2-MoE (a text-only student; lmod generate --backend vllm runs it)",
    "mixtral": "yes: vLLM's Mixtral (a text-only student)",
}


def parse_moe_layers(spec: str | list[int] | None, n_layers: int) -> list[int]:
    """'every-other' (default: 1, 3, 5, ... as MoE-LLaVA), 'all', '1,3,...' or a list of indices."""
    if isinstance(spec, list):
        layers = sorted(set(spec))
    elif spec in (None, "", "every-other"):
        layers = [i for i in range(n_layers) if i % 2 == 1]
    elif spec == "all":
        layers = list(range(n_layers))
    else:
        try:
            layers = sorted({int(x) for x in spec.split(",")})
        except ValueError:
            raise ValueError(f"--moe-layers {spec!r}: use every-other, all, or comma-separated indices") from None
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"moe layers {layers} must be a non-empty subset of 0..{n_layers - 1}")
    return layers


def _counterpart(text_type: str, interleaved: bool, base: Path) -> MoECounterpart:
    options = MOE_COUNTERPARTS.get(text_type)
    if not options:
        raise ValueError(f"{base}: its text model {text_type!r} has no MoE counterpart in lmod; supported: "
                         f"{', '.join(sorted(MOE_COUNTERPARTS))}")
    for option in options:
        if option.interleaved or not interleaved:
            return option
    raise ValueError(f"{base}: no MoE class for {text_type!r} with dense layers between MoE ones; use --moe-layers all")


def _expert_weights(dense: torch.Tensor, target_shape: torch.Size, key: str) -> torch.Tensor:
    """One dense matrix -> E stacked copies in the layout the MoE class keeps (some transpose)."""
    if tuple(target_shape[1:]) == tuple(dense.shape):
        return dense.unsqueeze(0).repeat(target_shape[0], 1, 1)
    if tuple(target_shape[1:]) == tuple(dense.T.shape):
        return dense.T.unsqueeze(0).repeat(target_shape[0], 1, 1).contiguous()
    raise ValueError(f"upcycling: {key} has shape {tuple(target_shape)}, the dense FFN {tuple(dense.shape)}")


def upcycle(
    dense_dir: Path, out: Path, num_experts: int = 4, top_k: int = 2, moe_layers: list[int] | str | None = None,
    noise: float = 0.0, seed: int = 0, check: bool = True,
) -> list[int]:
    """Write the MoE student under `out`: the dense MLLM's text FFNs become `num_experts` copies in
    the MoE counterpart of its text model, with fresh routers; vision tower, projector, processor,
    tokenizer and chat template carried over. Returns the layers that became MoE. With `check`, a
    text-only forward pass confirms the result equals the dense model (before any noise)."""
    from transformers import AutoConfig

    dense_dir, out = Path(dense_dir), Path(out)
    if not noise >= 0:  # NaN too
        raise ValueError(f"--noise {noise}: the relative noise on each expert copy must be >= 0")
    dcfg = AutoConfig.from_pretrained(str(dense_dir))  # refuse before loading any weights
    text = dcfg.get_text_config()
    n_layers = text.num_hidden_layers
    layers = parse_moe_layers(moe_layers, n_layers)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be between 1 and num_experts {num_experts}")
    target = _counterpart(text.model_type, len(layers) < n_layers, dense_dir)
    if getattr(text, "mlp_bias", False):
        raise ValueError(f"{dense_dir}: FFN biases are not supported by the MoE classes lmod upcycles into")
    dense = load_model(dense_dir, torch.float32).eval()
    moe_text = text.to_dict()
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type"):
        moe_text.pop(key, None)
    moe_text.update(dict(target.extra))
    moe_text.update({
        target.experts_key: num_experts, "num_experts_per_tok": top_k, "moe_intermediate_size": text.intermediate_size,
        "output_router_logits": False,
    })
    if target.interleaved:
        moe_text["mlp_only_layers"] = [i for i in range(n_layers) if i not in layers]
    if target.model_type == "qwen2_moe":
        # Always q/k/v biases (zero where the dense model has none): vLLM's Qwen2-MoE makes them
        # whatever the config says, and leaves missing ones uninitialised.
        moe_text["qkv_bias"] = True
        moe_text["use_sliding_window"] = bool(getattr(text, "use_sliding_window", False))
    moe_text = AutoConfig.for_model(target.model_type, **moe_text)
    if text is dcfg:  # a text-only model: the MoE text model is the whole student
        config = moe_text
    else:
        full = dcfg.to_dict()
        wrapper = MOE_WRAPPERS.get(dcfg.model_type, dcfg.model_type)
        for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "model_type"):
            full.pop(key, None)
        text_key = next(k for k in ("text_config", "llm_config") if k in full)
        full[text_key] = moe_text.to_dict()
        config = AutoConfig.for_model(wrapper, **full)
    torch.manual_seed(seed)
    moe = model_from_config(config, torch.float32)
    dense_sd, moe_sd = dense.state_dict(), moe.state_dict()
    used: set[str] = set()
    new_sd = {}
    for key, value in moe_sd.items():
        if key in dense_sd and dense_sd[key].shape == value.shape:
            new_sd[key] = dense_sd[key]
            used.add(key)
        elif key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("experts.gate_up_proj")]
            fused = torch.cat([dense_sd[prefix + "gate_proj.weight"], dense_sd[prefix + "up_proj.weight"]], 0)
            new_sd[key] = _expert_weights(fused, value.shape, key)
            used |= {prefix + "gate_proj.weight", prefix + "up_proj.weight"}
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("experts.down_proj")]
            new_sd[key] = _expert_weights(dense_sd[prefix + "down_proj.weight"], value.shape, key)
            used.add(prefix + "down_proj.weight")
        elif key.endswith("mlp.gate.weight"):
            new_sd[key] = torch.randn_like(value) * text.initializer_range  # a fresh router
        elif ".shared_expert" in key or key.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            new_sd[key] = torch.zeros_like(value)  # parts the dense model lacks: zero adds nothing
        else:
            raise ValueError(f"upcycling {dense_dir}: no dense source for {key}")
        if noise > 0 and ".experts." in key:
            new_sd[key] = new_sd[key] + noise * new_sd[key].std() * torch.randn_like(new_sd[key])
    dropped = [k for k in dense_sd if k not in used]
    if dropped:
        raise ValueError(f"upcycling {dense_dir} into {target.model_type} would drop weights: {dropped[:4]}")
    moe.load_state_dict(new_sd, strict=True)
    moe.generation_config = dense.generation_config
    if check and noise == 0:
        ids = torch.arange(16)[None] % max(2, text.vocab_size - 1) + 1
        with torch.no_grad():
            diff = (moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max().item()
        if diff > 1e-3:
            raise ValueError(f"upcycling {dense_dir}: the {target.model_type} student differs from the dense model "
                             f"by {diff:.2e} at init; its text model is not upcycled exactly")
    copy_processor(dense_dir, out)
    moe.save_pretrained(str(out))
    return layers


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters used per token: experts count top_k / num_experts of their size."""
    total = 0
    text = getattr(model.config, "text_config", model.config)
    frac = getattr(text, "num_experts_per_tok", 1) / max(1, getattr(text, "num_experts", 1) or 1)
    for name, p in model.named_parameters():
        total += int(p.numel() * frac) if ".experts." in name else p.numel()
    return total


def first_layers(teacher_dir: Path, out: Path, layers: int) -> dict[str, int]:
    """A dense student cut from the teacher: its first `layers` text-model layers, with the teacher's
    embeddings, final norm, head and (for an MLLM) vision tower and projector: the layer-dropping
    start of DistilBERT and Minitron. Same tokenizer and template, so it reads the teacher's dump
    as it is. Returns the teacher's and the student's layer counts and parameters."""
    import copy

    from transformers import AutoConfig

    teacher_dir, out = Path(teacher_dir), Path(out)
    total = AutoConfig.from_pretrained(str(teacher_dir)).get_text_config().num_hidden_layers
    if not 1 <= layers <= total:  # before any weights load
        raise ValueError(f"--layers {layers}: the teacher's text model has {total} layers; keep 1..{total}")
    teacher = load_model(teacher_dir, torch.float32)
    config = copy.deepcopy(teacher.config)
    text = config.get_text_config()
    text.num_hidden_layers = layers
    for key in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the layers kept
        value = getattr(text, key, None)
        if isinstance(value, list):
            setattr(text, key, [v for v in value if not isinstance(v, int) or v < layers]
                    if key == "mlp_only_layers" else value[:layers])
    student = model_from_config(config, torch.float32)
    source = teacher.state_dict()
    missing, unexpected = student.load_state_dict(source, strict=False)
    dropped_layer = [k for k in unexpected if not _is_layer_at_or_after(k, layers)]
    if missing or dropped_layer:
        raise ValueError(f"cutting {teacher_dir} to {layers} layers: weights do not line up "
                         f"(missing {missing[:3]}, unplaced {dropped_layer[:3]})")
    student.generation_config = teacher.generation_config
    copy_processor(teacher_dir, out)
    student.save_pretrained(str(out))
    return {"teacher_layers": total, "student_layers": layers,
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "student_parameters": sum(p.numel() for p in student.parameters())}


def _is_layer_at_or_after(key: str, n: int) -> bool:
    """A text-model decoder layer >= n (`...layers.7.mlp...`); vision-tower layers are not dropped."""
    pieces = key.split(".")
    return ("layers" in pieces and pieces.index("layers") + 1 < len(pieces)
            and pieces[pieces.index("layers") + 1].isdigit() and int(pieces[pieces.index("layers") + 1]) >= n
            and not any(v in pieces for v in ("vision_model", "vision_tower", "visual", "encoder")))
