"""Loading an MLLM's processor and turning samples into model inputs with the model's own chat
template and per-image token expansion (teacher backends, tiny teacher training, the student and
evaluation all go through here)."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from shared.families import Family, family_of
from shared.models import CAUSAL_LM, LOGIT_TRANSFORM_KEYS, kind_of, read_config
from shared.prompt import Messages, TemplateError, render_with_spans

# Images on which an encoder checks the processor's token-count helper before trusting it.
_COUNT_CHECKS = 4
# Processor outputs that describe text, not the image.
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class ImageFeatures:
    """One image as this model sees it: its token run and the tensors its forward takes."""

    ids: list[int]
    tensors: dict[str, torch.Tensor]  # leading dim 1 (one image), or flattened patches (Qwen-VL)


@dataclass
class ModelInputs:
    ids: list[int]  # expanded (the image's token run in place)
    prompt_ids: list[int]  # unexpanded: what vLLM is given with the image
    response_mask: list[bool]  # True where ids[i] is a response token (a label)
    turn_lengths: list[int]  # response tokens per assistant turn
    text: str  # the rendered conversation (unexpanded), for humans and independent checks
    images: list[ImageFeatures]  # in the order of their placeholders


Images = Sequence[ImageFeatures] | ImageFeatures | None


def _image_list(images: Images) -> list[ImageFeatures]:
    if images is None:
        return []
    return [images] if isinstance(images, ImageFeatures) else list(images)


class SampleEncoder:
    """Messages (+ image) -> ids and response mask, rendered by the model's chat template.

    `encode(..., responses=...)` puts stored response ids in place of the rendered answers: the
    student builds its prompt with its own template and learns the teacher's response tokens.
    """

    def __init__(self, processor: Any, name: str = "model", model_type: str = "", eos_ids: Sequence[int] = ()):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.name = name
        self.family: Family = family_of(model_type)
        self.template = (getattr(processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
                         or self.family.chat_template)
        if not self.template:
            raise TemplateError(f"{name}: ships no chat template; add one to its processor (chat_template.jinja) "
                                "or a family entry in shared/families.py")
        # A text-only model (its processor is a tokenizer) has no image token: records with images
        # are refused per record, text-only records work as for any model.
        self.multimodal = hasattr(processor, "image_processor")
        self.image_token: str | None = (str(getattr(processor, "image_token", None) or "<image>")  # BLIP-2: AddedToken
                                        if self.multimodal else None)
        self.image_token_id: int | None = (self.tokenizer.convert_tokens_to_ids(self.image_token)
                                           if self.multimodal else None)
        self.string_content = _wants_string_content(self.tokenizer, self.template, name)
        self.eos_ids = {int(i) for i in eos_ids} | {self.tokenizer.eos_token_id} - {None}
        self.pad_id: int = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Strings the tokenizer reads as special tokens wherever they appear: in user text they would
        # end a turn early, forge one, or become an image token.
        added = getattr(self.tokenizer, "added_tokens_decoder", {}) or {}
        # counted_image: the processor's token-count helper, if it has one, is checked against the full
        # processor on the first images before it is trusted; one disagreement and it is never used.
        self._count_helper_usable = hasattr(processor, "_get_num_multimodal_tokens")
        self._count_checks_left = _COUNT_CHECKS
        self.special_texts: list[str] = sorted(
            {str(t) for t in getattr(self.tokenizer, "all_special_tokens", [])}
            | {getattr(t, "content", str(t)) for t in added.values() if getattr(t, "special", False)}, key=len,
            reverse=True)

    @functools.cached_property
    def vocab_sha256(self) -> str:
        """The tokenizer's vocabulary fingerprint (ids mean the same to two tokenizers with the same one)."""
        from shared.fingerprint import vocabulary_facts

        return vocabulary_facts(self.tokenizer)["vocab_sha256"]

    def check_text(self, messages: Messages) -> None:
        """User text is text: a question or answer holding the literal text of a special token is
        refused, naming the token (the tokenizer would read it as that token: an answer cut at
        `<end_of_utterance>`, an assistant turn forged in a question)."""
        for i, message in enumerate(messages):
            for item in message["content"]:
                text = item.get("text") if isinstance(item, dict) else None
                hit = next((t for t in self.special_texts if text and t in text), None) if text else None
                if hit is not None:
                    part = "answer" if message["role"] == "assistant" else "question"
                    raise ValueError(f"the {part} of turn {i} contains {hit!r}, a special token of {self.name}'s "
                                     "tokenizer, which would read it as that token; remove it from the data")

    # -- text ---------------------------------------------------------------------------------
    def render(self, messages: Messages, add_generation_prompt: bool) -> str:
        if self.string_content:
            messages = [{**m, "content": self._as_string(m["content"])} for m in messages]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def _as_string(self, content: list[dict[str, Any]] | str) -> str:
        """Content parts -> the one string a string-content template concatenates: the text parts,
        with the model's image token where an image part stands (a text-only model has none)."""
        if isinstance(content, str):
            return content
        pieces = []
        for item in content:
            if item.get("type") == "image":
                if not self.multimodal:
                    raise ValueError(f"{self.name} is a text-only model and this record has an image; drop the "
                                     "image, or use a multimodal model")
                pieces.append(self.image_token)
            else:
                pieces.append(item["text"])
        return "\n".join(pieces)

    def _tokens(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]

    def _response_ranges(self, text: str, chunks: list[tuple[int, int]]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of `text` and, per assistant chunk, the token range of its response: from the
        token holding the chunk's first character through its first end-of-turn token. A token
        that crosses the start (a generation prompt ending in a space before a byte-level BPE
        answer: " red" is one token) belongs to the response, as in TRL's DPO tokenisation."""
        ids, offsets = self._tokens(text)
        ranges = []
        for lo, hi in chunks:
            inside = [t for t, (s, e) in enumerate(offsets) if e > lo and s < hi and e > s]
            if inside and offsets[inside[0]][0] < lo and ids[inside[0]] in self.eos_ids:
                raise TemplateError(f"{self.name}: the end-of-turn token crosses the start of an assistant turn in "
                                    f"{text!r}; prompt and response cannot be tokenised apart")
            end = next((t for t in inside if ids[t] in self.eos_ids), None)
            if not inside or end is None:
                eos = sorted(self.tokenizer.convert_ids_to_tokens(sorted(self.eos_ids)))
                raise TemplateError(f"{self.name}: its chat template ends an assistant turn without an end-of-turn "
                                    f"token (one of {eos}); the student could not learn to stop")
            ranges.append((inside[0], end + 1))
        return ids, ranges

    def encode(self, messages: Messages, images: Images = None,
               responses: Sequence[Sequence[int]] | None = None) -> ModelInputs:
        self.check_text(messages)
        rendered = render_with_spans(self.render, messages, self.name)
        ids, ranges = self._response_ranges(rendered.text, rendered.chunks)
        if responses is not None and len(responses) != len(ranges):
            raise ValueError(f"{len(responses)} stored responses for {len(ranges)} assistant turns")
        out: list[int] = []
        mask: list[bool] = []
        lengths: list[int] = []
        pos = 0
        for turn, (lo, hi) in enumerate(ranges):
            piece = list(responses[turn]) if responses is not None else ids[lo:hi]
            out += ids[pos:lo] + piece
            mask += [False] * (lo - pos) + [True] * len(piece)
            lengths.append(len(piece))
            pos = hi
        out += ids[pos:]
        mask += [False] * (len(ids) - pos)
        return self._with_images(out, mask, lengths, rendered.text, _image_list(images))

    def response_ids(self, messages: Messages) -> list[list[int]]:
        """This model's own token ids of each assistant turn (through its end-of-turn token), as its
        template renders the conversation: a cross-tokenizer student's labels. Text only."""
        self.check_text(messages)
        rendered = render_with_spans(self.render, messages, self.name)
        ids, ranges = self._response_ranges(rendered.text, rendered.chunks)
        return [ids[lo:hi] for lo, hi in ranges]

    def encode_prompt(self, messages: Messages, images: Images = None) -> ModelInputs:
        """The generation prompt for the last user turn (evaluation)."""
        self.check_text(messages)
        text = self.render(messages, True)
        ids, _ = self._tokens(text)
        return self._with_images(ids, [False] * len(ids), [], text, _image_list(images))

    # -- images -------------------------------------------------------------------------------
    def image_features(self, image: Image.Image | None) -> ImageFeatures | None:
        """The processor applied to this image: its own token count (image splitting, anyres and
        dynamic resolution included) and its tensors. Once per sample."""
        if image is None:
            return None
        self._check_multimodal()
        text = "" if self.family.image_at_start else self.image_token
        out = self.processor(text=text, images=[image], add_special_tokens=False, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        return ImageFeatures(ids, {k: v for k, v in out.items() if k not in _TEXT_KEYS})

    def counted_image(self, image: Image.Image) -> ImageFeatures:
        """An image's token run by its length only (placeholder ids, no tensors): what validation
        needs (the length against --max-model-len, the template). The count comes from the
        processor's own helper (`_get_num_multimodal_tokens`: sizes, no pixels) where the family
        has one, after it agreed with the full processor on this encoder's first images; else
        from the full processor."""
        self._check_multimodal()
        n = self._helper_count(image) if self._count_helper_usable else None
        if n is not None and self._count_checks_left == 0:
            return ImageFeatures([self.image_token_id] * n, {})
        full = self.image_features(image)
        if self._count_helper_usable:  # still checking it
            self._count_checks_left -= 1
            self._count_helper_usable = n == len(full.ids)
        return ImageFeatures(full.ids, {})

    def distrust_count_helper(self) -> None:
        """Count every later image with the full processor (the helper missed on one)."""
        self._count_helper_usable = False

    def _check_multimodal(self) -> None:
        if not self.multimodal:
            raise ValueError(f"{self.name} is a text-only model and this record has an image; drop the image "
                             "(or the record: --skip-invalid), or use a multimodal model")

    @property
    def _count_helper_ok(self) -> bool | None:
        """Whether counted_image trusts the helper: True, False, or None while it is being checked."""
        if not self._count_helper_usable:
            return False
        return True if self._count_checks_left == 0 else None

    def _helper_count(self, image: Image.Image) -> int | None:
        if self.family.image_at_start:  # BLIP-2's query tokens: no placeholder run to count
            return None
        try:
            return int(self.processor._get_num_multimodal_tokens(
                image_sizes=[(image.height, image.width)]).num_image_tokens[0])
        except Exception:  # a helper that does not take this processor's settings: count the long way
            return None

    def _with_images(self, ids: list[int], mask: list[bool], lengths: list[int], text: str,
                     images: list[ImageFeatures]) -> ModelInputs:
        """Each image's token run in place of its placeholder token, in order (or, for families
        that put the image before the text, BLIP-2's query tokens, in front: one image only)."""
        if images:
            self._check_multimodal()
        found = [i for i, t in enumerate(ids) if t == self.image_token_id] if self.multimodal else []
        if self.family.image_at_start and len(images) > 1:
            raise ValueError(f"{self.name}: {self.family.name} takes one image per sample, not {len(images)}")
        want = 0 if self.family.image_at_start else len(images)
        if len(found) != want:
            raise ValueError(f"{self.name}: {len(found)} image tokens ({self.image_token}) in the rendered sample, "
                             f"expected {want}; an {self.image_token} inside an answer, or a template that drops "
                             "images?")
        if not images:
            return ModelInputs(ids, ids, mask, lengths, text, [])
        if self.family.image_at_start:
            (image,) = images
            return ModelInputs(image.ids + ids, ids, [False] * len(image.ids) + mask, lengths, text, images)
        expanded, expanded_mask = list(ids), list(mask)
        for p, image in reversed(list(zip(found, images, strict=True))):  # right to left: earlier indices hold
            expanded[p : p + 1] = image.ids
            expanded_mask[p : p + 1] = [False] * len(image.ids)
        return ModelInputs(expanded, ids, expanded_mask, lengths, text, images)


_PROBE_Q, _PROBE_A = "lmodprobequestion", "lmodprobeanswer"


def _wants_string_content(tokenizer: Any, template: str, name: str) -> bool:
    """Whether a chat template needs each message's content as one string, decided from what it
    renders: a user and an assistant turn given as content parts must render each text once and no
    part structure (a template that concatenates `message['content']` raises; one that prints it
    shows the list). Parts are used wherever the template takes them (images are parts)."""
    def rendered(as_parts: bool) -> str | None:
        wrap = (lambda t: [{"type": "text", "text": t}]) if as_parts else (lambda t: t)
        messages = [{"role": "user", "content": wrap(_PROBE_Q)}, {"role": "assistant", "content": wrap(_PROBE_A)}]
        try:
            return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        except Exception:  # jinja raises TypeError / TemplateError / UndefinedError on the wrong shape
            return None

    def clean(text: str | None) -> bool:
        return (text is not None and text.count(_PROBE_Q) == 1 and text.count(_PROBE_A) == 1
                and "'type'" not in text and '"type"' not in text)

    if clean(rendered(True)):
        return False
    if clean(rendered(False)):
        return True
    raise TemplateError(f"{name}: its chat template renders neither content parts nor string content of a "
                        "user and an assistant turn; give the model a chat template that does")


def collate_images(features: Sequence[ImageFeatures | None]) -> dict[str, torch.Tensor]:
    """Batch the tensors of the images present, one entry per image (a sample with two images gives
    two, in order: models fill image tokens in sequence, Idefics3 and LLaVA-NeXT flatten images
    across the batch and drop all-zero padding ones, Qwen-VL reads one grid per image).
    Per-image tensors (leading dim 1) are zero-padded to the largest (crops, patches: the models
    drop all-zero padding crops or read the true sizes from `image_sizes`); flattened patch tensors
    (Qwen-VL) are concatenated."""
    present = [f.tensors for f in features if f is not None]
    if not present:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key in present[0]:
        ts = [t[key] for t in present]
        if all(t.dim() >= 2 and t.shape[0] == 1 for t in ts):
            shape = [max(t.shape[d] for t in ts) for d in range(1, ts[0].dim())]
            batch = ts[0].new_zeros((len(ts), *shape))
            for i, t in enumerate(ts):
                batch[(i, *(slice(0, n) for n in t.shape[1:]))] = t[0]
            out[key] = batch
        else:
            out[key] = torch.cat(ts, 0)
    return out


def batch_inputs(encoder: SampleEncoder, seqs: Sequence[Sequence[int]], images: Sequence[Images],
                 device: str | torch.device = "cpu", float_dtype: torch.dtype | None = None,
                 left: bool = False) -> dict[str, torch.Tensor]:
    """One forward's inputs: padded ids (right, or left for generation), the images' tensors (per
    sequence: its images, one, or None) and whatever else the family's forward needs."""
    ids, attn = pad_batch(seqs, encoder.pad_id, left=left)
    inputs = {"input_ids": ids, "attention_mask": attn,
              **collate_images([f for per_seq in images for f in _image_list(per_seq)])}
    if encoder.family.mm_token_type_ids:
        inputs["mm_token_type_ids"] = (ids == encoder.image_token_id).long()
    return {k: v.to(device, float_dtype if float_dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in inputs.items()}


def load_processor(model_dir: str | Path) -> Any:
    """The model's processor; for a text-only model its tokenizer (whatever processor class its
    tokenizer files name: a text model cut from an MLLM keeps them)."""
    from transformers import AutoProcessor, AutoTokenizer

    if kind_of(model_dir) == CAUSAL_LM:
        return AutoTokenizer.from_pretrained(str(model_dir))
    return AutoProcessor.from_pretrained(str(model_dir))


def load_encoder(model_dir: str | Path) -> SampleEncoder:
    """The encoder of a local model directory: processor, chat template, family, end-of-turn ids."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    eos: list[int] = []
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        value = json.loads(gen.read_text()).get("eos_token_id")
        eos = [value] if isinstance(value, int) else list(value or [])
    return SampleEncoder(load_processor(model_dir), name=str(model_dir), model_type=config.get("model_type", ""),
                         eos_ids=eos)


class FinalHidden:
    """The model's final hidden states instead of its logits: while active, a forward pre-hook on the
    output projection keeps the hidden states it is handed and passes on an empty slice, so the
    model's forward (DDP's included) runs its body only and no [batch, length, V] logits exist. The
    caller projects the positions it needs with `head` (losses.OutputHead), chunk by chunk."""

    def __init__(self, model: torch.nn.Module, student: bool = True):
        head = model.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise TypeError(f"{type(model).__name__}: no output projection (get_output_embeddings) to apply apart")
        text = model.config.get_text_config()
        for key in LOGIT_TRANSFORM_KEYS if student else ():  # a teacher applies them (shared.models.logit_transform)
            if getattr(text, key, None) not in (None, 1.0):
                raise TypeError(f"{type(model).__name__}: {key}={getattr(text, key)} changes the logits after the "
                                "output projection, which lmod's fused losses do not apply; this family is not "
                                "supported as a student yet")
        self.head = head
        self.hidden: torch.Tensor | None = None
        self.active = False
        head.register_forward_pre_hook(self._keep)

    @classmethod
    def of(cls, model: torch.nn.Module, student: bool = True) -> FinalHidden:
        """The model's tap, made once (each one adds a hook to the output projection). A student's
        losses project with the bare head, so families that change logits after it are refused."""
        tap = getattr(model, "_lmod_final_hidden", None)
        if tap is None or tap.head is not model.get_output_embeddings():
            tap = cls(model, student)
            model._lmod_final_hidden = tap
        return tap

    def _keep(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self.active:
            return None
        (hidden, *rest) = args
        self.hidden = hidden
        return (hidden[..., :0, :], *rest)

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states [B, L, H] of `model(**inputs)` (model may be a DDP wrapper)."""
        self.active, self.hidden = True, None
        try:
            model(**inputs)
        finally:
            self.active = False
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the model's forward never reached its output projection")
        return hidden


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router modules of a transformers MoE text model (their forward returns router logits first)."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "num_experts")]


def expert_counts(router_logits: Sequence[torch.Tensor], token_mask: torch.Tensor, top_k: int) -> torch.Tensor:
    """Routed slots per MoE layer and expert [layers, E] over the real tokens (`token_mask` [B, L],
    the layers' router logits [B * L, E]): how often each expert is among a token's top-k."""
    keep = token_mask.reshape(-1).bool()
    return torch.stack([torch.bincount(lg[keep].topk(top_k, -1).indices.reshape(-1), minlength=lg.shape[-1])
                        for lg in router_logits]).float()


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token id lists (right, or left for generation); returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(list(s), dtype=torch.long)
        attn[i, span] = 1
    return ids, attn
