"""A transformers LLaVA around a deployment's vision tower and projector, for policyc's own runtime to run on.

policyc compiles onto transformers models (its adapters find towers, layers and projectors by structure), so
the vLLM model keeps a transformers `LlavaForConditionalGeneration` whose tower and projector are the ones it
serves with (`llava_shell`) and whose language model is a one-layer stand-in that never runs: the stages run
on the real modules, through the same code as `policyc.compile_model` on transformers.

`probe_shell` is a miniature of the same geometry (image and patch size, encoder depth, CLS, feature layer and
strategy) with narrow random layers: enough to count the tokens a policy keeps without the model's weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

PROBE_WIDTH = 16  # the miniature's hidden size (vision and text) and two heads of 8
PROBE_SEED = 0


def _stand_in_text(config: Any, hidden_size: int, layers: int = 1) -> None:
    """Shrink `config.text_config` to `layers` narrow layers of `hidden_size` (the projector's output width)."""
    text = config.text_config
    text.num_hidden_layers = layers
    text.hidden_size = hidden_size
    text.intermediate_size = 1
    text.num_attention_heads = text.num_key_value_heads = 1
    text.head_dim = hidden_size
    text.vocab_size = max(int(getattr(config, "image_token_id", 0) or 0), 1) + 1
    text.layer_types = None


def llava_shell(config: Any) -> nn.Module:
    """A transformers LLaVA with `config`'s vision tower and projector (weights to be loaded) and a one-layer
    stand-in LLM, in eval mode, built in the current default dtype and device."""
    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(config)
    _stand_in_text(config, config.text_config.hidden_size)
    config.vision_config._attn_implementation = "sdpa"
    return LlavaForConditionalGeneration(config).eval()


def probe_shell(config: Any) -> nn.Module:
    """A miniature LLaVA of `config`'s geometry (its LLM as deep, for LLM stages to bind and be refused) with
    random weights (seeded), float32 on the CPU."""
    from transformers import LlavaForConditionalGeneration

    config = copy.deepcopy(config)
    vision = config.vision_config
    vision.hidden_size = vision.intermediate_size = PROBE_WIDTH
    vision.num_attention_heads = 2
    vision.projection_dim = PROBE_WIDTH
    _stand_in_text(config, PROBE_WIDTH, config.text_config.num_hidden_layers)  # LLM stages bind, to be refused
    with torch.random.fork_rng(), torch.device("cpu"):
        torch.manual_seed(PROBE_SEED)
        return LlavaForConditionalGeneration(config).to(torch.float32).eval()


def probe_images(config: Any) -> torch.Tensor:
    """Three inputs of the tower's size, [3, C, H, W]: a constant image and two random ones (seeded)."""
    vision = config.vision_config
    rows, cols = (vision.image_size,) * 2 if isinstance(vision.image_size, int) else tuple(vision.image_size)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    images = torch.randn(3, getattr(vision, "num_channels", 3), rows, cols, generator=generator)
    images[0] = 0.0
    return images


__all__ = ["llava_shell", "probe_images", "probe_shell"]
