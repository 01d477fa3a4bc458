"""Attention signals without eager attention: the LLM keeps running its own attention (SDPA, or eager
where the model was loaded with it), and a registered attention function wrapping it hands the post-RoPE
queries and keys of chosen layers to a recorder; the `attention` operator (passes/attention.py) scores
only the query rows a policy needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

ATTENTION_NAME = "policyc_sdpa"
Recorder = Callable[[torch.Tensor, torch.Tensor, float], None]


def _recording_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """SDPA, unchanged; during prefill also passes (query, key, scale) to the module's recorder."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _record(module, query, key, kwargs)
    return output


def _record(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, kwargs: dict[str, Any]) -> None:
    recorder: Recorder | None = getattr(module, "_policyc_recorder", None)
    if recorder is not None and query.shape[2] > 1:
        scaling = kwargs.get("scaling")
        # A static cache returns all its slots; in prefill only the first query-length ones are filled.
        keys = key[:, :, : query.shape[2]]
        recorder(query, keys, float(scaling) if scaling is not None else query.shape[-1] ** -0.5)


def _recording(base: str) -> Callable[..., Any]:
    """The model's own attention `base` ("eager": the modeling file's eager function), recording."""
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        inner = sys.modules[type(module).__module__].eager_attention_forward if base == "eager" \
            else ALL_ATTENTION_FUNCTIONS[base]
        output = inner(module, query, key, value, attention_mask, **kwargs)
        _record(module, query, key, kwargs)
        return output
    return attention


def register(base: str = "sdpa") -> str:
    """Register a recording version of the attention implementation `base` (and its mask function) with
    transformers; returns its name. Other implementations than sdpa and eager fall back to sdpa."""
    if base == "sdpa" or (base != "eager" and base not in ALL_ATTENTION_FUNCTIONS):
        AttentionInterface.register(ATTENTION_NAME, _recording_sdpa)
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
        return ATTENTION_NAME
    name = f"policyc_{base}"
    AttentionInterface.register(name, _recording(base))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
