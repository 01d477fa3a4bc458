"""Tiny random Mistral 3 models (`Mistral3ForConditionalGeneration`: a Pixtral tower, RMSNorm -> 2x2 patch merger ->
MLP projector, and a Mistral or Ministral 3 LLM) built from configs (no downloads), and inputs that fit them.

The tower sees 8x8-pixel patches and the merger folds 2x2 of them, so an image of H x W pixels (multiples of 16) gives
(H/16) x (W/16) LLM tokens. A prompt writes each image as the Pixtral processor does: rows of `[IMG]` x (W/16), each
followed by `[IMG_BREAK]`, the last break replaced by `[IMG_END]` (Mistral's tokenizer ids 10, 12, 13). Pixel values
are [images, 3, Hmax, Wmax], each image padded at the bottom and right, with `image_sizes` [images, 2] in pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import transformers

IMAGE_ID, BREAK_ID, END_ID, PAD_ID, VOCAB = 10, 12, 13, 0, 128
PATCH, MERGE = 8, 2
TEXT_MODELS = ("mistral", "ministral3")


def tiny_mistral3(seed: int = 0, num_llm_layers: int = 4, text: str = "mistral", std: float = 0.2) -> Any:
    """A tiny `Mistral3ForConditionalGeneration` with random weights from `seed` (normal, `std`: 0.2 makes greedy
    tokens vary; 32 such layers give large logits, so deep models take transformers' 0.02): a 2-layer Pixtral tower
    (hidden 32, 2 heads), a `text` ("mistral" or "ministral3") LLM of `num_llm_layers` layers (hidden 64, 4 query
    heads, 2 key/value heads)."""
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=128, patch_size=PATCH)
    common = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "num_hidden_layers": num_llm_layers, "vocab_size": VOCAB,
              "max_position_embeddings": 512, "initializer_range": std, "pad_token_id": PAD_ID, "bos_token_id": 1,
              "eos_token_id": 2}
    if text == "mistral":
        text_config: Any = transformers.MistralConfig(**common, sliding_window=None)
    elif text == "ministral3":
        text_config = transformers.Ministral3Config(**common, rope_parameters={
            "rope_type": "default", "rope_theta": 1e4, "llama_4_scaling_beta": 0.1,
            "original_max_position_embeddings": 16})  # the scale grows past position 16: positions matter
    else:
        raise ValueError(f"unknown text model {text!r}")
    config = transformers.Mistral3Config(vision_config=vision, text_config=text_config, image_token_index=IMAGE_ID,
                                         spatial_merge_size=MERGE, vision_feature_layer=-1)
    torch.manual_seed(seed)
    model = transformers.Mistral3ForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                       dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def image_ids(height: int, width: int) -> list[int]:
    """The ids the Pixtral processor writes for an image of `height` x `width` pixels."""
    rows, columns = height // (PATCH * MERGE), width // (PATCH * MERGE)
    ids = ([IMAGE_ID] * columns + [BREAK_ID]) * rows
    ids[-1] = END_ID
    return ids


def make_mistral3_inputs(images: Sequence[Sequence[tuple[int, int]]], pad_left: int = 2, seed: int = 0,
                         text: int = 6) -> dict[str, torch.Tensor]:
    """A left-padded batch: row b holds the images `images[b]` ((height, width) pixels each), each after `text` random
    text ids, then `text` more; the longest row gets `pad_left` padding too (rows alone: `single_mistral3`)."""
    generator = torch.Generator().manual_seed(seed)
    rows, pictures = [], []
    for sizes in images:
        row: list[int] = []
        for height, width in sizes:
            row += torch.randint(20, VOCAB, (text,), generator=generator).tolist() + image_ids(height, width)
            pictures.append(torch.randn(3, height, width, generator=generator))
        rows.append(row + torch.randint(20, VOCAB, (text,), generator=generator).tolist())
    length = max(len(r) for r in rows) + (pad_left if len(rows) > 1 else 0)
    input_ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for b, row in enumerate(rows):
        input_ids[b, length - len(row):] = torch.tensor(row)
        attention_mask[b, length - len(row):] = 1
    height, width = max(p.shape[1] for p in pictures), max(p.shape[2] for p in pictures)
    pixel_values = torch.zeros(len(pictures), 3, height, width)
    for i, picture in enumerate(pictures):
        pixel_values[i, :, :picture.shape[1], :picture.shape[2]] = picture
    sizes = torch.tensor([list(p.shape[1:]) for p in pictures])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
            "image_sizes": sizes}


def single_mistral3(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a batch alone: its padding removed, its own images (cropped to the largest of them)."""
    valid = inputs["attention_mask"][row].bool()
    ids = inputs["input_ids"][row][valid][None]
    counts = [int((ids_b == END_ID).sum()) for ids_b in inputs["input_ids"]]  # one [IMG_END] per image
    first = sum(counts[:row])
    sizes = inputs["image_sizes"][first:first + counts[row]]
    height, width = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": inputs["pixel_values"][first:first + counts[row], :, :height, :width],
            "image_sizes": sizes}


__all__ = ["BREAK_ID", "END_ID", "IMAGE_ID", "PAD_ID", "TEXT_MODELS", "image_ids", "make_mistral3_inputs",
           "single_mistral3", "tiny_mistral3"]
