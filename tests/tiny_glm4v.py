"""A tiny random GLM-4.1V (`glm4v`) or GLM-4.5V (`glm4v_moe`) built from a config (no downloads); its inputs are
`make_qwen_inputs`'s (the same ids: `<|begin_of_image|>` 120, `<|image|>` 121, `<|end_of_image|>` 123).

Tower: 2 RMSNorm blocks of width 32 on 4x4-pixel patches (Conv3d over 2 frames), a learned 8x8 position grid
resampled per image, then `post_layernorm`, the 2x2 `downsample` Conv2d (4 consecutive rows) and the GLU merger.
LLM: GLM-4 text model of width 64 with sandwich norms, GQA (4 query, 2 key/value heads of 16), chunked M-RoPE
sections [2, 1, 1] on half of each head (partial_rotary_factor 0.5); the MoE variant routes each token to 2 of 4
experts plus a shared one from layer 1 on (`first_k_dense_replace=1`). Vocab 128.
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_models import PAD_ID, QWEN_END_ID, QWEN_IMAGE_ID, QWEN_MERGE, QWEN_PATCH, QWEN_START_ID, QWEN_VIDEO_ID, VOCAB

GLM_VIDEO_START_ID, GLM_VIDEO_END_ID = 124, 125


def tiny_glm4v(seed: int = 0, num_llm_layers: int = 4, *, moe: bool = False) -> Any:
    """Glm4vForConditionalGeneration (`moe`: Glm4vMoeForConditionalGeneration), sdpa attention, float32, eval mode,
    with `num_llm_layers` decoder layers."""
    import transformers

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": num_llm_layers, "vocab_size": VOCAB, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                "mrope_section": [2, 1, 1]},
            "pad_token_id": PAD_ID}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "image_size": 8 * QWEN_PATCH,
              "patch_size": QWEN_PATCH, "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": 2,
              "out_hidden_size": 64}
    if moe:
        text |= {"moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
                 "first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 1, "topk_group": 1}
        config_class, model_class = transformers.Glm4vMoeConfig, transformers.Glm4vMoeForConditionalGeneration
    else:
        config_class, model_class = transformers.Glm4vConfig, transformers.Glm4vForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_ID,
                          video_token_id=QWEN_VIDEO_ID, image_start_token_id=QWEN_START_ID,
                          image_end_token_id=QWEN_END_ID, video_start_token_id=GLM_VIDEO_START_ID,
                          video_end_token_id=GLM_VIDEO_END_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def make_glm_video_inputs(batch: int = 1, videos: tuple[tuple[int, int, int], ...] = ((2, 8, 8),),
                          images: tuple[tuple[int, int], ...] = (), pad_left: int = 0, seed: int = 0,
                          ) -> dict[str, torch.Tensor]:
    """GLM inputs with videos as `Glm4vProcessor` gives them: per row, left padding, three text tokens, per image of
    `images` (h x w patches) `<|begin_of_image|>`, h*w/4 `<|image|>`, `<|end_of_image|>`; per video of (t, h, w) (t
    frame groups of 2 frames) `<|begin_of_video|>`, then per frame group `<|begin_of_image|>`, h*w/4 `<|image|>` (the
    image token), `<|end_of_image|>` and its timestamp (a text token), then `<|end_of_video|>`; then four text
    tokens. `mm_token_type_ids` is 1 on image tokens and 2 on video tokens: only it tells them apart. Every row holds
    the same images and videos (`qwen_single_row` splits them)."""
    generator = torch.Generator().manual_seed(seed)
    pads = [pad_left if b > 0 else 0 for b in range(batch)]
    specials = {QWEN_START_ID, QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_END_ID, GLM_VIDEO_START_ID, GLM_VIDEO_END_ID}
    text = torch.tensor([i for i in range(3, VOCAB) if i not in specials and i != PAD_ID])
    patch = 3 * 2 * QWEN_PATCH * QWEN_PATCH
    rows, types, masks, video_pixels, image_pixels = [], [], [], [], []
    for pad in pads:
        before = 3 + min(pads) - pad
        words = iter(text[torch.randint(len(text), (before + 4 + sum(t for t, _, _ in videos),),
                                        generator=generator)].tolist())
        row = [PAD_ID] * pad + [next(words) for _ in range(before)]
        kind = [0] * len(row)
        for h, w in images:
            n = h * w // QWEN_MERGE**2
            row += [QWEN_START_ID] + [QWEN_IMAGE_ID] * n + [QWEN_END_ID]
            kind += [0] + [1] * n + [0]
            image_pixels.append(torch.randn(h * w, patch, generator=generator))
        for t, h, w in videos:
            n = h * w // QWEN_MERGE**2
            row.append(GLM_VIDEO_START_ID)
            kind.append(0)
            for _ in range(t):
                row += [QWEN_START_ID] + [QWEN_IMAGE_ID] * n + [QWEN_END_ID, next(words)]
                kind += [0] + [2] * n + [0, 0]
            row.append(GLM_VIDEO_END_ID)
            kind.append(0)
            video_pixels.append(torch.randn(t * h * w, patch, generator=generator))
        tail = list(words)
        rows.append(row + tail)
        types.append(kind + [0] * len(tail))
        masks.append([0] * pad + [1] * (len(row) + len(tail) - pad))
    inputs = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks),
              "mm_token_type_ids": torch.tensor(types),
              "pixel_values_videos": torch.cat(video_pixels),
              "video_grid_thw": torch.tensor([[t, h, w] for _ in pads for t, h, w in videos])}
    if images:
        inputs.update({"pixel_values": torch.cat(image_pixels),
                       "image_grid_thw": torch.tensor([[1, h, w] for _ in pads for h, w in images])})
    return inputs


__all__ = ["make_glm_video_inputs", "tiny_glm4v"]
