"""A tiny random Gemma 3 built from a config (no downloads), and inputs as its processor gives them.

SigLIP tower: 32x32 images in 4x4-pixel patches (an 8x8 grid), pooled 2x2 to 16 image tokens. LLM: Gemma 3 text
model of width 64 with GQA (4 query, 2 key/value heads of 16), sliding window 8, every third layer global (so a
prompt of 30 tokens crosses the window), vocab 128.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

GEMMA_IMAGE_ID, GEMMA_BEGIN_ID, GEMMA_END_ID = 100, 101, 102  # <image_soft_token>, <start_of_image>, <end_of_image>
GEMMA_PAD_ID, VOCAB, IMAGE_TOKENS, WINDOW = 0, 128, 16, 8


def tiny_gemma3(seed: int = 0, num_llm_layers: int = 6, *, window: int = WINDOW, vocab: int = VOCAB,
                ids: tuple[int, int, int] = (GEMMA_IMAGE_ID, GEMMA_BEGIN_ID, GEMMA_END_ID)) -> Any:
    """Gemma3ForConditionalGeneration (sdpa attention, float32, eval mode) with `num_llm_layers` decoder layers,
    layer types sliding, sliding, global, ... (pattern 3); `vocab` and `ids` (`<image_soft_token>`,
    `<start_of_image>`, `<end_of_image>`) to fit another tokenizer, e.g. `gemma3_processor`'s."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_hidden_layers": num_llm_layers, "vocab_size": vocab, "max_position_embeddings": 512,
            "sliding_window": window, "sliding_window_pattern": 3, "query_pre_attn_scalar": 16,
            "pad_token_id": GEMMA_PAD_ID, "bos_token_id": 2, "eos_token_id": 1}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_hidden_layers": 2, "image_size": 32, "patch_size": 4}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=IMAGE_TOKENS,
                          image_token_index=ids[0], boi_token_index=ids[1], eoi_token_index=ids[2],
                          pad_token_id=GEMMA_PAD_ID)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # _init_weights zeroes the projection and the (1 + weight) norms: give them weights
        for name, parameter in model.named_parameters():
            if "norm" in name or "mm_input_projection" in name:
                parameter.normal_(0.0, 0.3)
    model.generation_config.pad_token_id = GEMMA_PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens (random weights do emit EOS)
    return model.eval()


PROCESSOR_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                    "eoi_token": "<end_of_image>"}  # ids 260, 261, 262 in gemma3_processor's tokenizer
PROCESSOR_VOCAB, PROCESSOR_IDS = 272, (261, 260, 262)  # tiny_gemma3's ids: image, begin, end


def gemma3_processor() -> Any:
    """A `Gemma3Processor` for `tiny_gemma3(vocab=PROCESSOR_VOCAB, ids=PROCESSOR_IDS)`: the PIL image processor
    (32x32) and policyc:random's byte-level tokenizer with `<start_of_image>`, `<image_soft_token>` and
    `<end_of_image>` added as the tokenizer's `boi_token`, `image_token` and `eoi_token`; 16 image tokens, and a
    chat template that writes `<start_of_image>` for an image, as Gemma 3's does."""
    import transformers

    from policyc.models.random_tiny import chat_template, random_tokenizer

    template = chat_template(PROCESSOR_TOKENS["boi_token"])
    tokenizer = random_tokenizer(list(PROCESSOR_TOKENS.values()), PROCESSOR_TOKENS, template)
    images = transformers.Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    return transformers.Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=IMAGE_TOKENS,
                                        chat_template=template)


def make_gemma3_inputs(batch: int = 1, images: int = 1, text_before: int = 3, text_after: int = 4,
                       pad_left: int | Sequence[int] = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Per row: left padding, text, then per image `<start_of_image>`, 16 image tokens and `<end_of_image>`
    (followed by two text tokens before the next image), then `text_after` text tokens; `token_type_ids` marks the
    image tokens with 1; `pixel_values` holds the images row by row ([batch * images, 3, 32, 32]). `pad_left` pads
    every row but the first (an int) or each row (a list); more padded rows get fewer text tokens before the image."""
    pads = [pad_left if b > 0 else 0 for b in range(batch)] if isinstance(pad_left, int) else list(pad_left)
    least = min(pads)
    generator = torch.Generator().manual_seed(seed)
    specials = {GEMMA_IMAGE_ID, GEMMA_BEGIN_ID, GEMMA_END_ID}
    text_ids = torch.tensor([i for i in range(3, VOCAB) if i not in specials])
    rows, masks = [], []
    for pad in pads:
        before = text_before + least - pad
        picks = text_ids[torch.randint(len(text_ids), (before + 2 * images + text_after,), generator=generator)]
        row = [GEMMA_PAD_ID] * pad + picks[:before].tolist()
        for index in range(images):
            row += [GEMMA_BEGIN_ID] + [GEMMA_IMAGE_ID] * IMAGE_TOKENS + [GEMMA_END_ID]
            if index < images - 1:
                row += picks[before + 2 * index : before + 2 * index + 2].tolist()
        row += picks[before + 2 * images :][:text_after].tolist()
        rows.append(row)
        masks.append([0] * pad + [1] * (len(row) - pad))
    input_ids = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": input_ids,
            "attention_mask": torch.tensor(masks, dtype=torch.long),
            "token_type_ids": (input_ids == GEMMA_IMAGE_ID).long(),
            "pixel_values": torch.randn(batch * images, 3, 32, 32, generator=generator)}


def single_gemma3(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a batch from `make_gemma3_inputs`, without its padding, with its own images."""
    valid = inputs["attention_mask"][row].bool()
    images = inputs["pixel_values"].shape[0] // inputs["input_ids"].shape[0]
    return {"input_ids": inputs["input_ids"][row:row + 1, valid],
            "attention_mask": inputs["attention_mask"][row:row + 1, valid],
            "token_type_ids": inputs["token_type_ids"][row:row + 1, valid],
            "pixel_values": inputs["pixel_values"][row * images:(row + 1) * images]}


__all__ = ["GEMMA_IMAGE_ID", "IMAGE_TOKENS", "PROCESSOR_IDS", "PROCESSOR_VOCAB", "WINDOW", "gemma3_processor",
           "make_gemma3_inputs", "single_gemma3", "tiny_gemma3"]
