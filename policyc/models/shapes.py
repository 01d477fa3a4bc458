"""Full-size architectures with random weights, for speed measurements where real weights cannot be downloaded
(`policyc bench --shapes NAME`).

Each shape is a transformers config with the published model's sizes; `build_shape` instantiates it with
`_from_config` under a device context (`torch.device("meta")` allocates nothing: tests count parameters
that way). The weights are random, so generated text is noise: only timings and memory mean anything.

Sources of the numbers:
- llava-1.5-7b: llava-hf/llava-1.5-7b-hf's config (the issue's anchors): CLIP ViT-L/14 at 336 px (24 layers,
  width 1024, 16 heads, MLP 4096, 576 patches + CLS), feature layer -2, strategy "default"; Llama-2-7B (width
  4096, 32 layers, 32 heads, MLP 11008, vocabulary 32064 as padded by llava-hf, 4096 positions); a 2-layer
  GELU projector (LLaVA's `mlp2x_gelu`). 7.06B parameters.
- qwen2.5-vl-7b: Qwen/Qwen2.5-VL-7B-Instruct's module sizes as a printed module tree shows them
  (acproject/duorou docs/qwen2.5vl_graph.md): vision 32 blocks, width 1280, MLP 3420 (SwiGLU), 16 heads, 14 px
  patches, 2x2 merger to 3584, window 112 with full attention at blocks 7, 15, 23, 31; text 28 layers, width
  3584, 28 heads of 128, 4 key/value heads, MLP 18944, vocabulary 152064; rope theta 1e6 and M-RoPE sections
  [16, 24, 24] as transformers' Qwen2.5-VL defaults and the released config set them.
- qwen3-vl-8b: Qwen/Qwen3-VL-8B-Instruct's config.json (as public repositories' test fixtures copy it verbatim):
  vision 27 blocks, width 1152, MLP 4304 (GELU-tanh), 16 heads, 16 px patches, a 48x48 learned position grid, 2x2
  merger to 4096, DeepStack mergers after blocks 8, 16, 24; text 36 layers, width 4096, 32 heads of 128, 8
  key/value heads, MLP 12288, vocabulary 151936, untied head, rope theta 5e6, interleaved M-RoPE sections
  [24, 20, 20]. 8.77B parameters (the model card's count).
- qwen3.5-27b: Qwen/Qwen3.5-27B's config (transformers' Qwen3_5Config docstring names that checkpoint; its defaults
  do not describe it: the sizes are the released config.json's, as public repositories copy it verbatim, e.g. a
  Qwen3_5Config(...) of the 27B in an image-benchmark's loader): vision Qwen3-VL's tower without DeepStack (27 blocks,
  width 1152, MLP 4304, 16 heads, 16 px patches, 48x48 position grid, 2x2 merger to 5120); text 64 layers of width
  5120, Gated DeltaNet layers with a full-attention layer every 4th (16 of them: 24 heads of 256, 4 key/value heads,
  output gate), DeltaNet 16 key heads and 48 value heads of 128, conv kernel 4, MLP 17408, vocabulary 248320, untied
  head, rope theta 1e7 on a quarter of each head, interleaved M-RoPE sections [11, 11, 10]. 27.36B parameters as
  transformers builds it (the model card's "27B"; its multi-token-prediction layer is not part of the model class).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from policyc.errors import PolicyError, suggestion


def llava_15_7b() -> Any:
    """LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14-336 + Llama-2-7B, 576 image tokens per image."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                       num_hidden_layers=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=32001, bos_token_id=1, eos_token_id=2)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=32000, projector_hidden_act="gelu",
                       vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=576,
                       pad_token_id=32001)


def qwen25_vl_7b() -> Any:
    """Qwen2.5-VL-7B-Instruct: a 32-block windowed ViT with a 2x2 merger + a 28-layer Qwen2.5 LLM (M-RoPE)."""
    from transformers import Qwen2_5_VLConfig

    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "hidden_act": "silu",
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2}
    text = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
            "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
            "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
            "bos_token_id": 151643, "eos_token_id": 151645}
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653)


def qwen3_vl_8b() -> Any:
    """Qwen3-VL-8B-Instruct: a 27-block ViT with DeepStack mergers + a 36-layer Qwen3 LLM (interleaved M-RoPE)."""
    from transformers import Qwen3VLConfig

    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
              "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 2304, "out_hidden_size": 4096, "deepstack_visual_indexes": [8, 16, 24]}
    text = {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "bos_token_id": 151643, "eos_token_id": 151645,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}
    return Qwen3VLConfig(vision_config=vision, text_config=text, image_token_id=151655, video_token_id=151656,
                         vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=False)


def qwen35_27b() -> Any:
    """Qwen3.5-27B: Qwen3-VL's 27-block ViT without DeepStack + a 64-layer hybrid LLM (3 Gated DeltaNet layers per
    full-attention one; interleaved M-RoPE on a quarter of each head)."""
    from transformers import Qwen3_5Config

    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
              "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 2304, "out_hidden_size": 5120}
    text = {"hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 64, "num_attention_heads": 24,
            "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 248320, "max_position_embeddings": 262144,
            "rms_norm_eps": 1e-6, "hidden_act": "silu", "eos_token_id": 248044, "tie_word_embeddings": False,
            "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_num_key_heads": 16, "linear_num_value_heads": 48,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 16,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [11, 11, 10], "mrope_interleaved": True}}
    return Qwen3_5Config(vision_config=vision, text_config=text, image_token_id=248056, video_token_id=248057,
                         vision_start_token_id=248053, vision_end_token_id=248054, tie_word_embeddings=False,
                         eos_token_id=248046, pad_token_id=248044)


SHAPES: dict[str, Callable[[], Any]] = {"llava-1.5-7b": llava_15_7b, "qwen2.5-vl-7b": qwen25_vl_7b,
                                        "qwen3-vl-8b": qwen3_vl_8b, "qwen3.5-27b": qwen35_27b}


def shape_config(name: str) -> Any:
    """The config of shape `name`; a PolicyError naming the closest shape otherwise."""
    if name not in SHAPES:
        raise PolicyError.at(f"unknown --shapes '{name}'", None, suggestion(name, sorted(SHAPES), "shapes"))
    return SHAPES[name]()


def build_shape(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> Any:
    """Shape `name` with random weights, built directly on `device` (no CPU copy first), in eval mode, SDPA."""
    from transformers import AutoModelForImageTextToText

    config = shape_config(name)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    generation = model.generation_config
    text = getattr(config, "text_config", config)
    generation.pad_token_id = getattr(config, "pad_token_id", None) or text.eos_token_id
    generation.bos_token_id, generation.eos_token_id = text.bos_token_id, text.eos_token_id
    return model.eval()


__all__ = ["SHAPES", "build_shape", "shape_config"]
