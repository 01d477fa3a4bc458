"""Tiny random vision-language models built from configs (no downloads), and inputs that fit them.

Both LLaVA variants see 32x32 images in 8x8 patches: a 4x4 grid, 16 image tokens per image. The
LLM is a 4-layer Llama with GQA (4 query heads, 2 key/value heads), vocab 128, image token id 100.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

IMAGE_TOKEN_ID = 100
PAD_ID = 0
VOCAB = 128


def _llama(num_layers: int) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                       num_hidden_layers=num_layers, vocab_size=VOCAB, max_position_embeddings=256,
                       pad_token_id=PAD_ID, bos_token_id=1, eos_token_id=2)


def _llava(vision: Any, seed: int, num_llm_layers: int, strategy: str,
           feature_layer: int) -> LlavaForConditionalGeneration:
    config = LlavaConfig(vision_config=vision, text_config=_llama(num_llm_layers), image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         image_seq_length=16, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def tiny_llava_clip(seed: int = 0, num_vision_layers: int = 3, num_llm_layers: int = 4, *,
                    strategy: str = "default", feature_layer: int = -2) -> LlavaForConditionalGeneration:
    """LLaVA with a CLIP tower (hidden 32, 4 heads, 16 patches + CLS); "default" drops CLS: 16 image tokens."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=num_vision_layers, image_size=32, patch_size=8, projection_dim=32)
    return _llava(vision, seed, num_llm_layers, strategy, feature_layer)


def tiny_llava_siglip(seed: int = 0, num_vision_layers: int = 3, num_llm_layers: int = 4, *,
                      strategy: str = "full", feature_layer: int = -2) -> LlavaForConditionalGeneration:
    """LLaVA with a SigLIP tower (no CLS). Strategy "full", as SigLIP LLaVA checkpoints use: 16 image tokens.

    ("default" would drop the first *patch*, leaving 15.)
    """
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                num_hidden_layers=num_vision_layers, image_size=32, patch_size=8)
    return _llava(vision, seed, num_llm_layers, strategy, feature_layer)


def image_tokens(model: LlavaForConditionalGeneration) -> int:
    """Image tokens per image, from the config alone (an oracle independent of the adapters)."""
    vision = model.config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    cls = int(vision.model_type == "clip_vision_model")
    return patches + cls - int(model.config.vision_feature_select_strategy == "default")


def make_inputs(model: LlavaForConditionalGeneration, batch: int = 1, text_before: int = 3, text_after: int = 4,
                pad_left: int | Sequence[int] = 0, seed: int = 0, images: int = 1) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and pixel_values for `batch` rows of `images` images each.

    Row b is `pad[b]` pad tokens (id 0, mask 0), then text, the image tokens (id 100) and `text_after`
    text tokens; with several images, each further image's tokens follow two more text tokens, and
    pixel_values holds the images row by row ([batch * images, 3, H, W]). `pad_left` is a count per
    row, or an int that pads every row but the first (so a batch mixes padded and unpadded rows). The
    first row with the least padding has `text_before` text tokens before the image; more padded rows
    have correspondingly fewer, so all rows have the same length. Text ids are random in 3..127, never
    the image or pad id.
    """
    pads = [pad_left if b > 0 else 0 for b in range(batch)] if isinstance(pad_left, int) else list(pad_left)
    if len(pads) != batch or any(p < 0 for p in pads) or text_before < 0 or text_after < 0:
        raise ValueError(f"bad padding {pads} for batch {batch}")
    least = min(pads)
    generator = torch.Generator().manual_seed(seed)
    text_ids = torch.tensor([i for i in range(3, VOCAB) if i != IMAGE_TOKEN_ID])
    n_image = image_tokens(model)
    rows, masks = [], []
    for pad in pads:
        before = text_before + least - pad
        if before < 0:
            raise ValueError(f"padding {pad} leaves no room in {text_before + least} text tokens before the image")
        between = 2 * (images - 1)
        picks = text_ids[torch.randint(len(text_ids), (before + between + text_after,), generator=generator)]
        row = [PAD_ID] * pad + picks[:before].tolist() + [IMAGE_TOKEN_ID] * n_image
        for image in range(images - 1):
            row += picks[before + 2 * image : before + 2 * image + 2].tolist() + [IMAGE_TOKEN_ID] * n_image
        row += picks[before + between :].tolist()
        rows.append(row)
        masks.append([0] * pad + [1] * (len(row) - pad))
    size = model.config.vision_config.image_size
    pixel_values = torch.randn(batch * images, 3, size, size, generator=generator)
    return {
        "input_ids": torch.tensor(rows, dtype=torch.long),
        "attention_mask": torch.tensor(masks, dtype=torch.long),
        "pixel_values": pixel_values.to(model.dtype),
    }


__all__ = ["IMAGE_TOKEN_ID", "PAD_ID", "image_tokens", "make_inputs", "tiny_llava_clip", "tiny_llava_siglip"]
