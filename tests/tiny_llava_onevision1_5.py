"""A tiny random LLaVA-OneVision-1.5 (`llava_onevision1_5`) built from a config (no downloads), and its inputs.

Tower (RICE-ViT): 2 pre-norm blocks of width 32 on 4x4-pixel patches (Conv2d, no temporal patch), 2-D rotary, one
CLS row prepended to every frame (`cu_seqlens` counts it) and stripped before the 2x2 merger (LayerNorm + MLP).
LLM: a plain Qwen3 text model of width 64 with GQA (4 query, 2 key/value heads of 16), q/k norms and 1-D RoPE;
vocab 128, ids Qwen2-VL's tiny ones (tests/tiny_models.py). No `mm_token_type_ids`: positions are 1-D.
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_models import (
    PAD_ID,
    QWEN_END_ID,
    QWEN_IMAGE_ID,
    QWEN_PATCH,
    QWEN_START_ID,
    QWEN_VIDEO_ID,
    VOCAB,
    make_qwen_inputs,
)

Inputs = dict[str, torch.Tensor]


def tiny_llava_onevision1_5(seed: int = 0, num_llm_layers: int = 4) -> Any:
    """LlavaOnevision15ForConditionalGeneration, sdpa attention, float32, eval mode, `num_llm_layers` LLM layers."""
    import transformers

    text = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "num_hidden_layers": num_llm_layers, "vocab_size": VOCAB,
            "max_position_embeddings": 512, "pad_token_id": PAD_ID}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": QWEN_PATCH,
              "spatial_merge_size": 2, "out_hidden_size": 64}
    config = transformers.LlavaOnevision15Config(
        text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_ID, video_token_id=QWEN_VIDEO_ID,
        vision_start_token_id=QWEN_START_ID, vision_end_token_id=QWEN_END_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = transformers.LlavaOnevision15ForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                                                dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def make_ov15_inputs(batch: int = 1, grids: tuple[tuple[int, int], ...] = ((8, 8),), pad_left: int = 0,
                     seed: int = 0, videos: tuple[tuple[int, int, int], ...] = ()) -> Inputs:
    """`make_qwen_inputs`'s prompts (`<vision_start>`, h*w/4 image tokens, `<vision_end>` per image) as the OV-1.5
    processor gives them: no `mm_token_type_ids`, each patch flattened without a temporal patch [3 * 4 * 4]. Each
    video of `videos` (t frames of h x w patches) follows as `<vision_start>`, t*h*w/4 video tokens, `<vision_end>`
    and two text tokens, its patches in `pixel_values_videos` and its grid in `video_grid_thw`."""
    inputs = make_qwen_inputs(batch=batch, grids=grids, pad_left=pad_left, seed=seed)
    del inputs["mm_token_type_ids"]
    width = 3 * QWEN_PATCH * QWEN_PATCH
    inputs["pixel_values"] = inputs["pixel_values"][:, :width].contiguous()
    if videos:
        generator = torch.Generator().manual_seed(seed + 1)
        run = [token for t, h, w in videos
               for token in [QWEN_START_ID, *[QWEN_VIDEO_ID] * (t * h * w // 4), QWEN_END_ID, 5, 6]]
        ids = inputs["input_ids"]
        inputs["input_ids"] = torch.cat([ids[:, :-2], torch.tensor([run] * batch), ids[:, -2:]], 1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"][:, :-2], torch.ones(batch, len(run),
                                              dtype=torch.long), inputs["attention_mask"][:, -2:]], 1)
        patches = sum(t * h * w for t, h, w in videos)
        inputs["pixel_values_videos"] = torch.randn(batch * patches, width, generator=generator)
        inputs["video_grid_thw"] = torch.tensor([[t, h, w] for _ in range(batch) for t, h, w in videos])
    return inputs


def ov15_single_row(inputs: Inputs, row: int) -> Inputs:
    """Row `row` of a `make_ov15_inputs` batch without its padding, with its own images and videos."""
    valid = inputs["attention_mask"][row].bool()
    rows = inputs["input_ids"].shape[0]
    single = {"input_ids": inputs["input_ids"][row:row + 1, valid],
              "attention_mask": inputs["attention_mask"][row:row + 1, valid]}
    for pixels, grids in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pixels in inputs:
            patches, count = inputs[pixels].shape[0] // rows, inputs[grids].shape[0] // rows
            single[pixels] = inputs[pixels][row * patches:(row + 1) * patches]
            single[grids] = inputs[grids][row * count:(row + 1) * count]
    return single


__all__ = ["make_ov15_inputs", "ov15_single_row", "tiny_llava_onevision1_5"]
