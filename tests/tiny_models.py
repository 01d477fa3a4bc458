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
                    strategy: str = "default", feature_layer: int = -2,
                    image_size: int = 32) -> LlavaForConditionalGeneration:
    """LLaVA with a CLIP tower (hidden 32, 4 heads, 16 patches + CLS); "default" drops CLS: 16 image tokens.
    `image_size=8` gives one patch: a single image token."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                              num_hidden_layers=num_vision_layers, image_size=image_size, patch_size=8,
                              projection_dim=32)
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


QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_START_ID, QWEN_END_ID = 121, 122, 120, 123  # vision start/end frame an image
QWEN_PATCH, QWEN_MERGE = 4, 2
QWEN_IDS = (QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_START_ID, QWEN_END_ID)


def tiny_qwen2_vl(seed: int = 0, num_llm_layers: int = 4, *, version: str = "2", vocab: int = VOCAB,
                  ids: tuple[int, int, int, int] = QWEN_IDS) -> Any:
    """Qwen2-VL (`version="2"`) or Qwen2.5-VL (`"2.5"`, window attention in the encoder with block 1 global):
    2 encoder blocks of width 32 on 4x4-pixel patches with a 2x2 merger, a 4-layer Qwen2 LLM with GQA (4 query,
    2 key/value heads) and M-RoPE sections [2, 3, 3]; vocab 128. `vocab` and `ids` (image, video, vision start,
    vision end) to fit another tokenizer."""
    import transformers

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": num_llm_layers, "vocab_size": vocab, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "patch_size": QWEN_PATCH,
              "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2, "in_channels": 3}
    if version == "2":
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
        vision["mlp_ratio"] = 2
    elif version == "2.5":
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
        vision |= {"intermediate_size": 64, "out_hidden_size": 64, "window_size": 16, "fullatt_block_indexes": [1]}
    else:
        raise ValueError(f"unknown Qwen-VL version {version!r}")
    image, video, start, end = ids
    config = config_class(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                          vision_start_token_id=start, vision_end_token_id=end, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


def make_qwen_inputs(batch: int = 1, grids: Sequence[tuple[int, int]] = ((8, 8),), text_before: int = 3,
                     text_after: int = 4, pad_left: int | Sequence[int] = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs of `tiny_qwen2_vl` as its processor would give them: per row, left padding, text, then for each
    image of `grids` (patches per side, multiples of 2) `<vision_start>`, its (h/2)*(w/2) image tokens and
    `<vision_end>` followed by two text tokens (the last image by `text_after`); `pixel_values` holds every
    image's flattened patches ([patches, 3 * 2 * 4 * 4], rows then images), `image_grid_thw` their grids and
    `mm_token_type_ids` marks image tokens with 1. Padding works as in `make_inputs`."""
    pads = [pad_left if b > 0 else 0 for b in range(batch)] if isinstance(pad_left, int) else list(pad_left)
    least = min(pads)
    generator = torch.Generator().manual_seed(seed)
    specials = {QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_START_ID, QWEN_END_ID}
    text_ids = torch.tensor([i for i in range(3, VOCAB) if i not in specials])
    rows, masks = [], []
    for pad in pads:
        before = text_before + least - pad
        picks = text_ids[torch.randint(len(text_ids), (before + 2 * len(grids) + text_after,), generator=generator)]
        row = [PAD_ID] * pad + picks[:before].tolist()
        for index, (h, w) in enumerate(grids):
            row += [QWEN_START_ID] + [QWEN_IMAGE_ID] * (h * w // QWEN_MERGE**2) + [QWEN_END_ID]
            if index < len(grids) - 1:
                row += picks[before + 2 * index : before + 2 * index + 2].tolist()
        row += picks[before + 2 * len(grids) - 2 :][:text_after].tolist()
        rows.append(row)
        masks.append([0] * pad + [1] * (len(row) - pad))
    input_ids = torch.tensor(rows, dtype=torch.long)
    patches = sum(h * w for h, w in grids) * batch
    return {
        "input_ids": input_ids,
        "attention_mask": torch.tensor(masks, dtype=torch.long),
        "mm_token_type_ids": (input_ids == QWEN_IMAGE_ID).long(),
        "pixel_values": torch.randn(patches, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=generator),
        "image_grid_thw": torch.tensor([[1, h, w] for _ in range(batch) for h, w in grids]),
    }


def qwen_single_row(inputs: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row `row` of a Qwen2-VL batch (`make_qwen_inputs`, or videos), without its padding, with its own images and
    videos (every row holds as many, of the same grids)."""
    valid = inputs["attention_mask"][row].bool()
    rows = inputs["input_ids"].shape[0]
    single = {key: inputs[key][row:row + 1, valid] for key in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for pixels, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pixels in inputs:
            patches, count = inputs[pixels].shape[0] // rows, inputs[grids].shape[0] // rows
            single[pixels] = inputs[pixels][row * patches:(row + 1) * patches]
            single[grids] = inputs[grids][row * count:(row + 1) * count]
    return single


__all__ = ["IMAGE_TOKEN_ID", "PAD_ID", "QWEN_IMAGE_ID", "image_tokens", "make_inputs", "make_qwen_inputs",
           "qwen_single_row", "tiny_llava_clip", "tiny_llava_siglip", "tiny_qwen2_vl"]
