"""Tiny random Idefics3 and SmolVLM models built from configs (no downloads), and inputs laid out as their
processor lays them out.

The encoder sees 32x32 inputs in 8x8 patches (a 4x4 grid) and the connector's 2x2 pixel shuffle leaves 4 LLM
tokens per tile or global view. The LLM is a Llama with GQA (4 query heads, 2 key/value heads), vocab 128.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IMAGE_ID, FAKE_ID, GLOBAL_ID, NEWLINE_ID = 100, 101, 102, 10  # <image>, <fake_token_around_image>, <global-img>, \n
ROW_COL_IDS = [[103, 104, 105], [106, 107, 108]]  # <row_r_col_c> for r in 1..2, c in 1..3
PAD_ID, VOCAB, SIZE, PATCH, SCALE = 0, 128, 32, 8, 2
TOKENS_PER_TILE = (SIZE // PATCH) ** 2 // SCALE**2
SPECIAL = {PAD_ID, 1, 2, IMAGE_ID, FAKE_ID, GLOBAL_ID, NEWLINE_ID, *[i for row in ROW_COL_IDS for i in row]}
Split = tuple[int, int]  # tiles (rows, columns) of one image; (0, 0): the image unsplit


def tiny_idefics3(seed: int = 0, num_llm_layers: int = 4, *, smolvlm: bool = False, vocab: int = VOCAB,
                  image_id: int = IMAGE_ID) -> Any:
    """`Idefics3ForConditionalGeneration` (or, with `smolvlm`, `SmolVLMForConditionalGeneration`): 2 encoder
    layers of width 32 with 4 heads, scale factor 2, a `num_llm_layers`-layer Llama of width 64 (`vocab` and
    `image_id` to fit another tokenizer, e.g. `idefics3_processor`'s)."""
    import transformers

    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": num_llm_layers, "vocab_size": vocab,
            "max_position_embeddings": 512, "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": SIZE, "patch_size": PATCH}
    if smolvlm:
        config_class, model_class = transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration
    else:
        config_class, model_class = transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=image_id, scale_factor=SCALE,
                          pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


ROW_COL_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]  # all the processor names
PROCESSOR_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *ROW_COL_TOKENS]
PROCESSOR_VOCAB, PROCESSOR_IMAGE_ID = 304, 3  # random_tokenizer(PROCESSOR_TOKENS): ids 0..298, `<image>` 3


def idefics3_processor() -> Any:
    """An `Idefics3Processor` for `tiny_idefics3(vocab=PROCESSOR_VOCAB, image_id=PROCESSOR_IMAGE_ID)`: the PIL image
    processor (an image's longest side resized to 64 pixels and split into 32x32 tiles, plus its 32x32 global view)
    and policyc:random's byte-level tokenizer with the Idefics3 markers added, 4 `<image>` tokens per tile."""
    import transformers

    # from its module: transformers 5.17's import table marks the top-level name as needing torchvision
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    from policyc.models.random_tiny import chat_template, random_tokenizer

    images = Idefics3ImageProcessorPil(size={"longest_edge": 2 * SIZE}, max_image_size={"longest_edge": SIZE})
    return transformers.Idefics3Processor(image_processor=images, tokenizer=random_tokenizer(PROCESSOR_TOKENS),
                                          image_seq_len=TOKENS_PER_TILE, chat_template=chat_template())


def image_ids(split: Split) -> list[int]:
    """The processor's ids for one image split into `split` tiles (written out here, independently of
    `policyc.models.idefics3.image_prompt`)."""
    rows, cols = split
    if rows * cols == 0:
        return [FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * TOKENS_PER_TILE + [FAKE_ID]
    ids: list[int] = []
    for r in range(rows):
        for c in range(cols):
            ids += [FAKE_ID, ROW_COL_IDS[r][c]] + [IMAGE_ID] * TOKENS_PER_TILE
        ids += [NEWLINE_ID]
    return ids + [NEWLINE_ID, FAKE_ID, GLOBAL_ID] + [IMAGE_ID] * TOKENS_PER_TILE + [FAKE_ID]


def make_idefics3_inputs(batch: int = 1, images: Sequence[Sequence[Split]] = (((2, 2),),), text_before: int = 3,
                         text_after: int = 4, pad_left: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of `tiny_idefics3` as its processor gives them. Row b holds the images `images[b % len(images)]`:
    text, then each image's tiles and global view (`image_ids`) followed by two text tokens (the last image by
    `text_after`). Rows are left-padded (id 0, mask 0) to one length; every row but the first gets at least
    `pad_left` pads. `pixel_values` [B, N, 3, 32, 32] holds each row's tiles and global views in prompt order,
    rows with fewer than N padded with all-zero images; `pixel_attention_mask` [B, N, 32, 32] marks real
    pixels: a split image's global view is a 32x24 picture padded on the right, as a non-square image's is."""
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.tensor([i for i in range(3, VOCAB) if i not in SPECIAL])
    rows, pictures = [], []
    for b in range(batch):
        splits = images[b % len(images)]
        picks = text_ids[torch.randint(len(text_ids), (text_before + 2 * len(splits) + text_after,),
                                       generator=generator)].tolist()
        row, rest = picks[:text_before], picks[text_before:]
        for index, split in enumerate(splits):
            row += image_ids(split) + (rest[2 * index:2 * index + 2] if index < len(splits) - 1 else [])
        rows.append(row + rest[2 * len(splits) - 2:][:text_after])
        pictures.append([(split, torch.randn(max(split[0] * split[1], 0) + 1, 3, SIZE, SIZE, generator=generator))
                         for split in splits])
    length = max(len(row) + (pad_left if b else 0) for b, row in enumerate(rows))
    slots = max(sum(p.shape[0] for _, p in row) for row in pictures)
    pixel_values = torch.zeros(batch, slots, 3, SIZE, SIZE)
    pixel_mask = torch.zeros(batch, slots, SIZE, SIZE, dtype=torch.bool)
    for b, row in enumerate(pictures):
        index = 0
        for split, pixels in row:
            count = pixels.shape[0]
            pixel_values[b, index:index + count] = pixels
            pixel_mask[b, index:index + count] = True
            if split[0] * split[1]:  # the global view: 24 real columns, zeros and mask 0 on the right
                pixel_values[b, index + count - 1, :, :, 24:] = 0
                pixel_mask[b, index + count - 1, :, 24:] = False
            index += count
    return {
        "input_ids": torch.tensor([[PAD_ID] * (length - len(row)) + row for row in rows]),
        "attention_mask": torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows]),
        "pixel_values": pixel_values,
        "pixel_attention_mask": pixel_mask,
    }


def single_row(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a batch from `make_idefics3_inputs`, without its padding, with only its own images."""
    valid = inputs["attention_mask"][row].bool()
    images = int((inputs["input_ids"][row] == IMAGE_ID).sum()) // TOKENS_PER_TILE
    return {"input_ids": inputs["input_ids"][row:row + 1, valid],
            "attention_mask": inputs["attention_mask"][row:row + 1, valid],
            "pixel_values": inputs["pixel_values"][row:row + 1, :images],
            "pixel_attention_mask": inputs["pixel_attention_mask"][row:row + 1, :images]}


__all__ = ["FAKE_ID", "GLOBAL_ID", "IMAGE_ID", "PROCESSOR_IMAGE_ID", "PROCESSOR_VOCAB", "TOKENS_PER_TILE",
           "idefics3_processor", "image_ids", "make_idefics3_inputs", "single_row", "tiny_idefics3"]
