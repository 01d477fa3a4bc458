"""Tiny random LLaVA-NeXT and LLaVA-OneVision models built from configs (no downloads), and inputs that fit them.

Both see 32x32 base views and crops in 8x8 patches (a 4x4 grid); the image processors (PIL, no torchvision)
resize each image to its best grid pinpoint and crop it. LLaVA-NeXT: a CLIP tower ("default" strategy drops
CLS: 16 base tokens) and a Llama LLM; LLaVA-OneVision: a SigLIP tower ("full": 16 base tokens), anyres_max_2 (so
crops of large images are interpolated down) and a Qwen2 LLM. Both LLMs: hidden 64, GQA (4 query heads, 2
key/value heads), vocab 128.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image

IMAGE_ID, VIDEO_ID, PAD_ID, VOCAB = 100, 101, 0, 128
SIZE, PATCH = 32, 8
NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64]]
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
FAMILIES = ("llava_next", "llava_onevision")


def _text(family: str, num_layers: int, vocab: int) -> Any:
    config = transformers.LlamaConfig if family == "llava_next" else transformers.Qwen2Config
    return config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=num_layers, vocab_size=vocab, max_position_embeddings=512,
                  pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)


def tiny_anyres(family: str = "llava_next", seed: int = 0, num_llm_layers: int = 4, *, vocab: int = VOCAB,
                image_id: int = IMAGE_ID) -> Any:
    """A tiny `LlavaNextForConditionalGeneration` (`family="llava_next"`) or
    `LlavaOnevisionForConditionalGeneration` (`"llava_onevision"`) with random weights from `seed` (`vocab` and
    `image_id` to fit another tokenizer, e.g. `next_processor`'s)."""
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
              "image_size": SIZE, "patch_size": PATCH}
    if family == "llava_next":
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**vision, projection_dim=32),
            text_config=_text(family, num_llm_layers, vocab), image_token_id=image_id,
            image_grid_pinpoints=NEXT_PINPOINTS, vision_feature_select_strategy="default", vision_feature_layer=-2,
            pad_token_id=PAD_ID)
        model_class: Any = transformers.LlavaNextForConditionalGeneration
    elif family == "llava_onevision":
        config = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**vision), text_config=_text(family, num_llm_layers, vocab),
            image_token_id=image_id, video_token_id=VIDEO_ID, image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio="anyres_max_2", vision_feature_select_strategy="full", vision_feature_layer=-1,
            pad_token_id=PAD_ID)
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def image_processor(family: str) -> Any:
    """The family's image processor (the PIL one: no torchvision) at the tiny models' sizes."""
    if family == "llava_next":
        return transformers.LlavaNextImageProcessorPil(size={"shortest_edge": SIZE},
                                                       crop_size={"height": SIZE, "width": SIZE},
                                                       image_grid_pinpoints=NEXT_PINPOINTS)
    return transformers.LlavaOnevisionImageProcessorPil(size={"height": SIZE, "width": SIZE},
                                                        image_grid_pinpoints=ONEVISION_PINPOINTS)


def next_processor() -> Any:
    """A `LlavaNextProcessor` for the tiny LLaVA-NeXT: its image processor and policyc:random's byte-level tokenizer
    (vocab 260, `<image>` id 3: build the model with `tiny_anyres(vocab=272, image_id=3)`) and chat template. (No
    LLaVA-OneVision processor: it needs a video processor, which needs torchvision.)"""
    from policyc.models.random_tiny import CHAT_TEMPLATE, random_tokenizer

    return transformers.LlavaNextProcessor(image_processor=image_processor("llava_next"), tokenizer=random_tokenizer(),
                                           patch_size=PATCH, vision_feature_select_strategy="default",
                                           num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def make_anyres_inputs(model: Any, images: Sequence[Sequence[tuple[int, int]]] = (((40, 24),),),
                       videos: Sequence[int] = (), text_before: int = 3, text_after: int = 4, pad_left: int = 0,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs as the processor would give them, one row per entry of `images` (the (height, width) of each of
    the row's images): left padding to the longest row (plus `pad_left` on every row but the first), text, then
    per image its run of `<image>` placeholders followed by two text tokens (the last image by `text_after`).
    The pixels are random images through the family's image processor (`pixel_values` [images, patches, 3,
    32, 32], `image_sizes`; OneVision also `batch_num_images`); each run is as long as the model's own packed
    features for that image. `videos` (OneVision): per row, the frames of one video placed before its images
    (`pixel_values_videos` [rows, frames, 3, 32, 32], random), on as many `<video>` placeholders as
    `LlavaOnevisionProcessor` gives it (frames x 2x2-pooled grid, plus one newline)."""
    family = model.config.model_type
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    pictures = [[Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in row] for row in images]
    flat = [picture for row in pictures for picture in row]
    pixels = dict(image_processor(family)(pictures if family == "llava_onevision" else flat, return_tensors="pt"))
    extra = {"batch_num_images": pixels["batch_num_images"]} if "batch_num_images" in pixels else {}
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixels["pixel_values"],
                                                  image_sizes=pixels["image_sizes"], **extra).pooler_output
    counts = iter(len(f) for f in features)
    video_tokens = 0
    if videos:
        if len(videos) != len(images) or len(set(videos)) != 1:
            raise ValueError("one video per row, all with the same number of frames")
        pixels["pixel_values_videos"] = torch.randn(len(videos), videos[0], 3, SIZE, SIZE, generator=generator)
        video_tokens = videos[0] * math.ceil(SIZE // PATCH / 2) ** 2 + 1  # frames pooled 2x2, one newline
    text_ids = torch.tensor([i for i in range(3, VOCAB) if i not in (IMAGE_ID, VIDEO_ID)])
    rows = []
    for row in images:
        picks = text_ids[torch.randint(len(text_ids), (text_before + 2 * len(row) + text_after,),
                                       generator=generator)].tolist()
        ids = picks[:text_before] + [VIDEO_ID] * video_tokens
        for index in range(len(row)):
            ids += [IMAGE_ID] * next(counts) + (picks[text_before + 2 * index:][:2] if index < len(row) - 1 else [])
        rows.append(ids + picks[-text_after:])
    width = max(len(r) + (pad_left if b > 0 else 0) for b, r in enumerate(rows))
    return {"input_ids": torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            **pixels}


def single_row(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a batch from `make_anyres_inputs`, without its padding, with its own images and video."""
    valid = inputs["attention_mask"][row].bool()
    alone = {"input_ids": inputs["input_ids"][row:row + 1, valid],
             "attention_mask": inputs["attention_mask"][row:row + 1, valid]}
    if "batch_num_images" in inputs:
        counts = inputs["batch_num_images"].tolist()
        alone["batch_num_images"] = inputs["batch_num_images"][row:row + 1]
    else:  # LLaVA-NeXT: rows of equal image counts
        counts = [inputs["image_sizes"].shape[0] // inputs["input_ids"].shape[0]] * inputs["input_ids"].shape[0]
    first = sum(counts[:row])
    alone["pixel_values"] = inputs["pixel_values"][first:first + counts[row]]
    alone["image_sizes"] = inputs["image_sizes"][first:first + counts[row]]
    if "pixel_values_videos" in inputs:
        alone["pixel_values_videos"] = inputs["pixel_values_videos"][row:row + 1]
    return alone


__all__ = ["FAMILIES", "IMAGE_ID", "PAD_ID", "VIDEO_ID", "image_processor", "make_anyres_inputs", "next_processor",
           "single_row", "tiny_anyres"]
