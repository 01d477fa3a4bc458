"""A tiny random InternVL built from a config (no downloads), and inputs as its processor gives them.

InternViT: 32x32 tiles in 4x4-pixel patches (8x8 patches + CLS), pixel shuffle 0.5 to 16 tokens per tile, an MLP
projector; LLM: a Qwen2 decoder of width 64 with GQA (4 query, 2 key/value heads), vocab 128.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

INTERNVL_IMAGE_ID, INTERNVL_START_ID, INTERNVL_END_ID = 100, 101, 102  # <IMG_CONTEXT>, <img>, </img>
PAD_ID, VOCAB, TILE_TOKENS = 0, 128, 16


def tiny_internvl(seed: int = 0, num_llm_layers: int = 4, *, qk_norm: bool = False, vocab: int = VOCAB,
                  image_id: int = INTERNVL_IMAGE_ID) -> Any:
    """InternVLForConditionalGeneration (sdpa, float32, eval mode, no EOS stop) with a Qwen2 LLM; with `qk_norm`,
    InternViT normalises its attention queries and keys (`use_qk_norm`, as InternViT-6B does); `vocab` and
    `image_id` (`<IMG_CONTEXT>`) to fit another tokenizer."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": num_llm_layers, "vocab_size": vocab,
            "max_position_embeddings": 512, "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": [32, 32], "patch_size": [4, 4], "use_qk_norm": qk_norm}
    config = InternVLConfig(text_config=text, vision_config=vision, image_token_id=image_id,
                            image_seq_length=TILE_TOKENS, downsample_ratio=0.5)
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens (random weights do emit EOS)
    return model.eval()


def make_internvl_inputs(batch: int = 1, tiles: Sequence[int] = (2,), text_before: int = 3, text_after: int = 4,
                         pad_left: int | Sequence[int] = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per row: left padding, text, then per image of `tiles` tiles `<img>`, 16 `<IMG_CONTEXT>` per tile and
    `</img>` (two text tokens between images), then `text_after` text tokens; `pixel_values` holds every tile, rows
    then images ([batch * sum(tiles), 3, 32, 32]). Padding works as in tests/tiny_models.py `make_inputs`."""
    pads = [pad_left if b > 0 else 0 for b in range(batch)] if isinstance(pad_left, int) else list(pad_left)
    least = min(pads)
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.tensor([i for i in range(3, VOCAB) if i not in (INTERNVL_IMAGE_ID, INTERNVL_START_ID,
                                                                      INTERNVL_END_ID)])
    rows, masks = [], []
    for pad in pads:
        before = text_before + least - pad
        picks = text_ids[torch.randint(len(text_ids), (before + 2 * len(tiles) + text_after,), generator=generator)]
        row = [PAD_ID] * pad + picks[:before].tolist()
        for index, count in enumerate(tiles):
            row += [INTERNVL_START_ID] + [INTERNVL_IMAGE_ID] * (TILE_TOKENS * count) + [INTERNVL_END_ID]
            if index < len(tiles) - 1:
                row += picks[before + 2 * index : before + 2 * index + 2].tolist()
        row += picks[before + 2 * len(tiles) :][:text_after].tolist()
        rows.append(row)
        masks.append([0] * pad + [1] * (len(row) - pad))
    return {"input_ids": torch.tensor(rows, dtype=torch.long),
            "attention_mask": torch.tensor(masks, dtype=torch.long),
            "pixel_values": torch.randn(batch * sum(tiles), 3, 32, 32, generator=generator)}


def single_internvl(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a batch from `make_internvl_inputs`, without its padding, with its own tiles."""
    valid = inputs["attention_mask"][row].bool()
    tiles = inputs["pixel_values"].shape[0] // inputs["input_ids"].shape[0]
    return {"input_ids": inputs["input_ids"][row:row + 1, valid],
            "attention_mask": inputs["attention_mask"][row:row + 1, valid],
            "pixel_values": inputs["pixel_values"][row * tiles:(row + 1) * tiles]}


__all__ = ["INTERNVL_IMAGE_ID", "TILE_TOKENS", "make_internvl_inputs", "single_internvl", "tiny_internvl"]
