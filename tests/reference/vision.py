"""Plain pieces of a LLaVA vision tower, run by hand with the model's own weights (eager attention, one
image at a time), for the pre-LLM references. Shares no code with policyc."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import LlavaForConditionalGeneration


def tower(model: LlavaForConditionalGeneration) -> nn.Module:
    """The vision transformer (transformers 5.24 flattens `vision_model` away; 5.17 keeps it)."""
    outer = model.model.vision_tower
    return getattr(outer, "vision_model", outer)


def has_cls(model: LlavaForConditionalGeneration) -> bool:
    return model.config.vision_config.model_type == "clip_vision_model"


def feature_layer(model: LlavaForConditionalGeneration) -> int:
    """The encoder layer whose output LLaVA projects (hidden_states[k] is the output of layer k - 1)."""
    layers = model.config.vision_config.num_hidden_layers
    return model.config.vision_feature_layer % (layers + 1) - 1


def embed(model: LlavaForConditionalGeneration, image: Tensor) -> Tensor:
    """The encoder's input for one image [3, H, W]: [T, C] (CLS first on CLIP)."""
    vit = tower(model)
    x = vit.embeddings(image[None])
    if hasattr(vit, "pre_layrnorm"):
        x = vit.pre_layrnorm(x)
    return x[0]


def attention(attn: nn.Module, h: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Eager multi-head self-attention over h [T, C] with an optional per-key logit bias [T].
    Returns (output [T, C], keys [H, T, d], probabilities [H, T, T])."""
    tokens, heads = h.shape[0], attn.num_heads
    q = attn.q_proj(h).view(tokens, heads, -1).transpose(0, 1)
    k = attn.k_proj(h).view(tokens, heads, -1).transpose(0, 1)
    v = attn.v_proj(h).view(tokens, heads, -1).transpose(0, 1)
    logits = q @ k.transpose(-1, -2) * attn.scale
    if bias is not None:
        logits = logits + bias[None, None, :]
    probabilities = torch.softmax(logits, dim=-1)
    out = (probabilities @ v).transpose(0, 1).reshape(tokens, -1)
    return attn.out_proj(out), k, probabilities


def layers(model: LlavaForConditionalGeneration) -> nn.ModuleList:
    return tower(model).encoder.layers


def project(model: LlavaForConditionalGeneration, features: Tensor) -> Tensor:
    """The multimodal projector on [n, C] features: [n, D]."""
    return model.model.multi_modal_projector(features[None])[0]


def strategy_start(model: LlavaForConditionalGeneration) -> int:
    """First encoder token LLaVA keeps: 1 under "default" (drops CLS, or SigLIP's first patch), else 0."""
    return 1 if model.config.vision_feature_select_strategy == "default" else 0
