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
from tiny_models import PAD_ID, QWEN_END_ID, QWEN_IMAGE_ID, QWEN_MERGE, QWEN_PATCH, QWEN_START_ID, QWEN_VIDEO_ID, VOCAB

DEEPSTACK_BLOCKS = (0, 1, 2)


def tiny_qwen3_vl(seed: int = 0, num_llm_layers: int = 4, *, moe: bool = False) -> Any:
    """Qwen3VLForConditionalGeneration (`moe`: Qwen3VLMoeForConditionalGeneration), sdpa attention, float32, eval
    mode, with `num_llm_layers` decoder layers."""
    import transformers

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "num_hidden_layers": num_llm_layers, "vocab_size": VOCAB, "max_position_embeddings": 512,
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
    config = config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_ID,
                          video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_START_ID,
                          vision_end_token_id=QWEN_END_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():  # random DeepStack features of the LLM's scale, so that dropping them shows
        for merger in model.model.visual.deepstack_merger_list:
            merger.linear_fc2.weight.normal_(0.0, 0.2)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


__all__ = ["DEEPSTACK_BLOCKS", "tiny_qwen3_vl"]
