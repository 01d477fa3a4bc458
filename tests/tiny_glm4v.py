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


__all__ = ["tiny_glm4v"]
