"""Attention signals without eager attention: the LLM keeps running SDPA, and a registered
attention function hands the post-RoPE queries and keys of chosen layers to a recorder; the
`attention` operator (passes/attention.py) scores only the query rows a policy needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "policyc_sdpa"
Recorder = Callable[[torch.Tensor, torch.Tensor, float], None]


def _recording_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, **kwargs: object) -> tuple[torch.Tensor, None]:
    """SDPA, unchanged; during prefill also passes (query, key, scale) to the module's recorder."""
    output = sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    recorder: Recorder | None = getattr(module, "_policyc_recorder", None)
    if recorder is not None and query.shape[2] > 1 and not torch.compiler.is_compiling():  # graphs read q/k
        scaling = kwargs.get("scaling")
        # A static cache returns all its slots; in prefill only the first query-length ones are filled.
        keys = key[:, :, : query.shape[2]]
        recorder(query, keys, float(scaling) if scaling is not None else query.shape[-1] ** -0.5)
    return output


def register() -> str:
    """Register the recording attention (and its mask function) with transformers; returns its name."""
    AttentionInterface.register(ATTENTION_NAME, _recording_sdpa)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
