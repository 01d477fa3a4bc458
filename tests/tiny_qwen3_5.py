"""A tiny random Qwen3.5 (dense or MoE) built from a config (no downloads); its inputs are `make_qwen_inputs`'s.

Tower: Qwen3-VL's without DeepStack, 2 blocks of width 32 on 4x4-pixel patches (Conv3d over 2 frames), a learned
8x8 position grid resampled per image, a 2x2 merger. LLM: the hybrid Qwen3.5 text model of width 64, 8 layers of
types [linear, linear, linear, full] x 2 (Gated DeltaNet layers 0-2 and 4-6 with a 4-tap causal conv, 2 key and 4
value heads of 16; full-attention layers 3 and 7 with GQA, 4 query and 2 key/value heads of 32, an output gate and
q/k norms), partial rotary (a quarter of each head) with interleaved M-RoPE sections [2, 1, 1], vocab 128; the MoE
variant routes each token to 2 of 4 experts plus a shared expert in every layer. Ids are Qwen2-VL's tiny ones
(tests/tiny_models.py). Configs as in /work/shared/research/new-families.md section 4.
"""

from __future__ import annotations

from typing import Any

import torch
from tiny_models import PAD_ID, QWEN_END_ID, QWEN_IMAGE_ID, QWEN_MERGE, QWEN_PATCH, QWEN_START_ID, QWEN_VIDEO_ID, VOCAB

Inputs = dict[str, torch.Tensor]
FULL_LAYERS = (3, 7)  # the full-attention layers of the 8-layer LLM (every 4th)


def tiny_qwen3_5(seed: int = 0, num_llm_layers: int = 8, *, moe: bool = False,
                 full_layers: tuple[int, ...] | None = None) -> Any:
    """Qwen3_5ForConditionalGeneration (`moe`: Qwen3_5MoeForConditionalGeneration), sdpa attention, float32, eval
    mode, with `num_llm_layers` decoder layers: every 4th one full attention as released, or those `full_layers`."""
    import transformers

    text = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 32, "num_hidden_layers": num_llm_layers, "vocab_size": VOCAB, "max_position_embeddings": 512,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True},
            "pad_token_id": PAD_ID, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": QWEN_PATCH,
              "temporal_patch_size": 2, "spatial_merge_size": QWEN_MERGE, "out_hidden_size": 64,
              "num_position_embeddings": 64}
    if full_layers is not None:
        text["layer_types"] = ["full_attention" if k in full_layers else "linear_attention"
                               for k in range(num_llm_layers)]
    if moe:
        text |= {"moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
                 "num_experts_per_tok": 2}
        config_class, model_class = transformers.Qwen3_5MoeConfig, transformers.Qwen3_5MoeForConditionalGeneration
    else:
        config_class, model_class = transformers.Qwen3_5Config, transformers.Qwen3_5ForConditionalGeneration
    config = config_class(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE_ID,
                          video_token_id=QWEN_VIDEO_ID, vision_start_token_id=QWEN_START_ID,
                          vision_end_token_id=QWEN_END_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    model = model_class._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model.eval()


def pad_batch(rows: list[Inputs]) -> Inputs:
    """One left-padded batch of single-row inputs (`make_qwen_inputs(batch=1, ...)`, each with its own images)."""
    width = max(r["input_ids"].shape[1] for r in rows)

    def left(tensor: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)

    return {"input_ids": torch.cat([left(r["input_ids"], PAD_ID) for r in rows]),
            "attention_mask": torch.cat([left(r["attention_mask"], 0) for r in rows]),
            "mm_token_type_ids": torch.cat([left(r["mm_token_type_ids"], 0) for r in rows]),
            "pixel_values": torch.cat([r["pixel_values"] for r in rows]),
            "image_grid_thw": torch.cat([r["image_grid_thw"] for r in rows])}


__all__ = ["FULL_LAYERS", "pad_batch", "tiny_qwen3_5"]
