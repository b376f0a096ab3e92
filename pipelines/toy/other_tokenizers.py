"""Students whose tokenizer is not their teacher's, made from a tiny model directory (no downloads):

- `with_new_bpe`: a byte-level BPE trained here with another vocabulary size (other merges, other
  ids); embedding rows of tokens both vocabularies spell the same are carried over, the rest start
  fresh. A real cross-tokenizer student.
- `with_permuted_ids`: the same tokenizer with its non-special ids shuffled and the embedding and
  output rows moved with them: an equivalent model under other ids, for exactness tests.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _copy_without_weights(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in Path(src).iterdir():
        if path.is_file() and not path.name.startswith("model.safetensors"):
            shutil.copy2(path, dst / path.name)


def _load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32)


def with_new_bpe(model_dir: Path, out: Path, vocab_size: int, seed: int = 0) -> Path:
    """`model_dir` with a freshly trained BPE of `vocab_size` (same special tokens, same ids for them)."""
    from transformers import AutoTokenizer

    from pipelines.toy.tiny_teacher import train_tokenizer

    old = AutoTokenizer.from_pretrained(str(model_dir))
    _copy_without_weights(model_dir, out)
    train_tokenizer(out, vocab_size)
    new = AutoTokenizer.from_pretrained(str(out))
    for token in old.all_special_tokens:
        if new.convert_tokens_to_ids(token) != old.convert_tokens_to_ids(token):
            raise ValueError(f"special token {token!r} moved; the model's config would point at another id")
    model = _load(model_dir)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    torch.manual_seed(seed)
    model.resize_token_embeddings(len(new), mean_resizing=False)
    old_ids = old.get_vocab()
    with torch.no_grad():
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb.normal_(0, 0.02)
        head.normal_(0, 0.02)
        for token, i in new.get_vocab().items():
            j = old_ids.get(token)
            if j is not None and j < old_in.shape[0]:
                emb[i], head[i] = old_in[j], old_out[j]
    model.save_pretrained(str(out))
    return out


def with_permuted_ids(model_dir: Path, out: Path, seed: int = 0) -> tuple[Path, dict[int, int]]:
    """`model_dir` with its non-special token ids permuted (returns old id -> new id)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    special = set(tok.all_special_ids) | {int(i) for i in tok.added_tokens_decoder}
    spec = json.loads((Path(model_dir) / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    movable = sorted(i for i in vocab.values() if i not in special)
    shuffled = list(movable)
    random.Random(seed).shuffle(shuffled)
    new_id = dict(zip(movable, shuffled, strict=True))
    spec["model"]["vocab"] = {t: new_id.get(i, i) for t, i in vocab.items()}
    _copy_without_weights(model_dir, out)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    model = _load(model_dir)
    with torch.no_grad():
        for module in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings())}.values():
            old = module.weight.detach().clone()
            for i, j in new_id.items():
                module.weight[j] = old[i]
    model.save_pretrained(str(out))
    return out, new_id
