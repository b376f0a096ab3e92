"""Input validation throughput, side by side in one run: records/s on one core of the validator
(`teacher_dump/worker.py:check_shard`, what each Ray validator actor runs) when every image goes
through the processor (pixel tensors made, then dropped) vs when its token count comes from the
processor's own counting helper (`_get_num_multimodal_tokens`), on photo-sized images with the
processors of SmolVLM (image splitting) and LLaVA-NeXT (anyres) at their real checkpoints' sizes.

    python pipelines/benchmarks/bench_validate.py [--records 200] [--size 768x512]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def _world(out: Path, records: int, size: tuple[int, int], seed: int = 0) -> Path:
    """Records asking about distinct photo-sized images (no two share one: no cache hits)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(records):
        pixels = (rng.random((size[1] // 8, size[0] // 8, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).resize(size).save(out / "images" / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"id": f"r{i}", "image": f"images/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "a red circle at top left"}]}))
    (out / "mimic.jsonl").write_text("\n".join(lines) + "\n")
    return out / "mimic.jsonl"


def _real_sized_processor(family: str, model_dir: Path, tok) -> None:
    """The stand-in's processor with its real checkpoint's image sizes (validation needs the
    processor only): SmolVLM-Instruct (384 px crops, up to 4x4 + global, 81 tokens each) and
    llava-v1.6 (336 px tiles, anyres up to 672x672, 576 tokens each)."""
    if family == "smolvlm":
        from transformers import Idefics3ImageProcessorPil, Idefics3Processor

        from pipelines.toy.tiny_families import SMOLVLM_TEMPLATE

        images = Idefics3ImageProcessorPil(do_resize=True, size={"longest_edge": 4 * 384},
                                           max_image_size={"longest_edge": 384}, do_image_splitting=True)
        Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=81,
                          chat_template=SMOLVLM_TEMPLATE).save_pretrained(str(model_dir))
    else:
        from transformers import LlavaNextProcessor
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        from pipelines.toy.tiny_families import LLAVA_NEXT_TEMPLATE

        pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        images = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                            image_grid_pinpoints=pinpoints)
        LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14,
                           vision_feature_select_strategy="default", chat_template=LLAVA_NEXT_TEMPLATE,
                           num_additional_image_tokens=1).save_pretrained(str(model_dir))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200)
    ap.add_argument("--size", default="768x512")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))

    import torch

    from pipelines.toy.tiny_families import build_tiny_family, family_tokenizer
    from shared.mllm import load_encoder
    from teacher_dump.inputs import plan_slices
    from teacher_dump.worker import ShardTask, check_shard

    torch.set_num_threads(1)  # one validator actor per CPU
    root = Path(tempfile.mkdtemp(prefix="lmod-bench-validate-"))
    data = _world(root / "world", args.records, size)
    tok = family_tokenizer(root / "tok")
    rows = {}
    for family in ("smolvlm", "llava_next"):
        model = build_tiny_family(family, root / family, tok)
        _real_sized_processor(family, model, tok)
        encoder = load_encoder(model)
        (sl,) = plan_slices(data, "mimic", 1, args.records)
        task = ShardTask("mimic", 0, "mimic/x", sl, str(root / "world"))
        result = {}
        for mode, count_only in (("processor", False), ("count helper", True)):
            start = time.perf_counter()
            check = check_shard(encoder, task, 8192, count_only=count_only)
            elapsed = time.perf_counter() - start
            assert check.records == args.records, check.rejected[:1]
            result[mode] = {"records_per_s": args.records / elapsed, "tokens": check.tokens}
        assert result["processor"]["tokens"] == result["count helper"]["tokens"]  # the same lengths
        rows[family] = result
    print(json.dumps(rows, indent=2))
    print(f"\n| stand-in ({args.size} images) | processor, records/s/core | count helper | ratio |\n|---|---|---|---|")
    for family, r in rows.items():
        a, b = r["processor"]["records_per_s"], r["count helper"]["records_per_s"]
        print(f"| {family} | {a:.0f} | {b:.0f} | {b / a:.2f} |")


if __name__ == "__main__":
    main()
