"""A tiny random Qwen3-VL (dense or MoE) built from a config (no downloads); its inputs are `make_qwen_inputs`'s.

Tower: 4 blocks of width 32 on 4x4-pixel patches (Conv3d over 2 frames), a learned 8x8 position grid resampled
per image, a 2x2 merger, and DeepStack mergers after blocks 0, 1 and 2 (3 DeepStack levels, added after LLM layers
0, 1 and 2; depth and level count differ, as in the released 27-block towers). LLM: Qwen3-VL text model of width 64
with GQA (4 query, 2 key/value heads of 16), q/k norms, interleaved M-RoPE sections [4, 2, 2], vocab 128; the MoE
variant routes each token to 2 of 4 experts in every layer. Ids are Qwen2-VL's tiny ones (tests/tiny_models.py).
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_models import (
    PAD_ID,
    QWEN_END_ID,
    QWEN_IDS,
    QWEN_IMAGE_ID,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_START_ID,
    QWEN_VIDEO_ID,
    VOCAB,
)

Inputs = dict[str, torch.Tensor]

DEEPSTACK_BLOCKS = (0, 1, 2)


def tiny_qwen3_vl(seed: int = 0, num_llm_layers: int = 4, *, moe: bool = False, vocab: int = VOCAB,
                  ids: tuple[int, int, int, int] = QWEN_IDS) -> Any:
    """Qwen3VLForConditionalGeneration (`moe`: Qwen3VLMoeForConditionalGeneration), sdpa attention, float32, eval
    mode, with `num_llm_layers` decoder layers; `vocab` and `ids` (image, video, vision start, vision end) to fit
    another tokenizer."""
    import transformers

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_hidden_layers": num_llm_layers, "vocab_size": vocab, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
            "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": 4, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": QWEN_PATCH,
              "temporal_patch_size": 2, "spatial_merge_size": QWEN_MERGE, "out_hidden_size": 64,
              "num_position_embeddings": 64, "deepstack_visual_indexes": list(DEEPSTACK_BLOCKS)}
    if moe:
        text |= {"moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 1}
        config_class, model_class = transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
    else:
        config_class, model_class = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    image, video, start, end = ids
    config = config_class(text_config=text, vision_config=vision, image_token_id=image, video_token_id=video,
                          vision_start_token_id=start, vision_end_token_id=end, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # random DeepStack features of the LLM's scale, so that dropping them shows
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def make_qwen3_video_inputs(batch: int = 1, videos: tuple[tuple[int, int, int], ...] = ((2, 8, 8),),
                            images: tuple[tuple[int, int], ...] = (), pad_left: int = 0, seed: int = 0) -> Inputs:
    """Qwen3-VL inputs with videos as its processor gives them (`Qwen3VLProcessor.replace_video_token`): per row, left
    padding, three text tokens, then per image of `images` (h x w patches) `<vision_start>`, h*w/4 image tokens,
    `<vision_end>`, then per video of (t, h, w) (t frame groups of 2 frames, h x w patches) and per frame group a
    timestamp text token, `<vision_start>`, h*w/4 video tokens, `<vision_end>`; then four text tokens.
    `mm_token_type_ids` marks image tokens with 1 and video tokens with 2; every row holds the same images and videos
    (`qwen_single_row` splits them)."""
    generator = torch.Generator().manual_seed(seed)
    pads = [pad_left if b > 0 else 0 for b in range(batch)]
    text = torch.tensor([i for i in range(3, QWEN_START_ID) if i != PAD_ID])
    patch = 3 * 2 * QWEN_PATCH * QWEN_PATCH
    rows, masks, video_pixels, image_pixels = [], [], [], []
    for pad in pads:
        before = 3 + min(pads) - pad
        picks = text[torch.randint(len(text), (before + 4 + sum(t for t, _, _ in videos),), generator=generator)]
        words = iter(picks.tolist())
        row = [PAD_ID] * pad + [next(words) for _ in range(before)]
        for h, w in images:
            row += [QWEN_START_ID] + [QWEN_IMAGE_ID] * (h * w // QWEN_MERGE**2) + [QWEN_END_ID]
            image_pixels.append(torch.randn(h * w, patch, generator=generator))
        for t, h, w in videos:
            for _ in range(t):
                row += [next(words), QWEN_START_ID] + [QWEN_VIDEO_ID] * (h * w // QWEN_MERGE**2) + [QWEN_END_ID]
            video_pixels.append(torch.randn(t * h * w, patch, generator=generator))
        row += list(words)
        rows.append(row)
        masks.append([0] * pad + [1] * (len(row) - pad))
    ids = torch.tensor(rows)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor(masks),
              "mm_token_type_ids": (ids == QWEN_IMAGE_ID).long() + (ids == QWEN_VIDEO_ID).long() * 2,
              "pixel_values_videos": torch.cat(video_pixels),
              "video_grid_thw": torch.tensor([[t, h, w] for _ in pads for t, h, w in videos])}
    if images:
        inputs.update({"pixel_values": torch.cat(image_pixels),
                       "image_grid_thw": torch.tensor([[1, h, w] for _ in pads for h, w in images])})
    return inputs


__all__ = ["DEEPSTACK_BLOCKS", "make_qwen3_video_inputs", "tiny_qwen3_vl"]
