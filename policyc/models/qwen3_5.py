"""Qwen3.5 and Qwen3.5-MoE (`Qwen3_5ForConditionalGeneration`, `Qwen3_5MoeForConditionalGeneration`).

What differs from Qwen3-VL (models/qwen3_vl.py):
- The tower is Qwen3-VL's without DeepStack; prompts, `mm_token_type_ids` and interleaved M-RoPE positions are
  Qwen3-VL's (the LLM's rotary covers a quarter of each head, `partial_rotary_factor`), so `QwenVLAdapter`'s inputs,
  layouts and packed-tower handling apply as they are.
- The LLM is hybrid (`text_config.layer_types`): three of every four layers are Gated DeltaNet layers
  (`linear_attention`: a causal depthwise conv and the gated delta rule, arXiv:2412.06464), the fourth full attention
  (an output-gated `Qwen3_5Attention`). A linear layer has no positions, no attention weights and no KV cache: a
  fixed-size conv and recurrent state summarises every token it saw. Hence:
  - a drop in an LLM stage narrows the sequence for every layer after it, linear ones included: their recurrence
    runs over the kept rows only, as neighbours (runtime/hybrid.py). Where the samples of a batch keep different
    counts, a linear layer sees its fillers moved before every real token (masked left rows leave its state exact;
    masked rows in the middle would not);
  - signals that read attention (`attention`, keys, values) exist only at full-attention layers: naming a linear
    layer fails at compile time, naming the nearest full ones (compiler/plan.py);
  - decode-time cache policies (H2O, SnapKV, ...) evict from the full-attention layers' KV caches only
    (runtime/cache.py); the linear layers' states are left as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from policyc.models.base import ModelAdapter, register_adapter
from policyc.models.qwen2_vl import QwenVLAdapter, QwenVLFactory
from policyc.models.structure import (
    LINEAR_ATTENTION,
    adapt_error,
    language_model,
    linear_layers,
)

MODEL_TYPES = {"qwen3_5": "Qwen3.5", "qwen3_5_moe": "Qwen3.5-MoE"}
LAYER_TYPES = frozenset({LINEAR_ATTENTION, "full_attention"})


@dataclass(frozen=True, eq=False)
class Qwen35Adapter(QwenVLAdapter):
    """A Qwen3.5 adapter: Qwen2-VL's inputs and tower, a hybrid LLM (`layer_types`: linear or full attention)."""

    @property
    def linear_layers(self) -> tuple[int, ...]:
        """The Gated DeltaNet layers (no attention, no KV cache)."""
        return linear_layers(self.layer_types)

    def describe(self) -> str:
        full = [k for k in range(len(self.decoder_layers)) if k not in self.linear_layers]
        return (f"{super().describe()}\nhybrid llm: Gated DeltaNet (linear attention) at layers "
                f"{_ranges(self.linear_layers)}; full attention at layers {_ranges(full)} (attention signals and "
                "KV cache policies there only)")


def _ranges(layers: list[int] | tuple[int, ...]) -> str:
    """`0..2, 4..6`: consecutive layer indices folded into ranges."""
    parts: list[str] = []
    for k in layers:
        if parts and parts[-1].split("..")[-1] == str(k - 1):
            parts[-1] = f"{parts[-1].split('..')[0]}..{k}"
        else:
            parts.append(str(k))
    return ", ".join(parts) or "none"


@register_adapter
class Qwen35Factory(QwenVLFactory):
    """Qwen3.5 and Qwen3.5-MoE: Qwen2-VL's stages on a hybrid Gated DeltaNet / full-attention LLM."""

    family = "qwen3_5"
    description = "Qwen3.5 and Qwen3.5-MoE (hybrid Gated DeltaNet LLM; encoder merges, projector, LLM and decode " \
        "stages, attention signals and cache policies at its full-attention layers)"
    model_types = frozenset(MODEL_TYPES)
    default_patch_size = 16

    def build(self, model: nn.Module) -> ModelAdapter:
        text_config = model.config.text_config
        llm = language_model(model, self.family, mixer="linear_attn")
        layer_types = tuple(getattr(text_config, "layer_types", None) or ())
        if len(layer_types) != len(llm["decoder_layers"]) or not set(layer_types) <= LAYER_TYPES:
            raise adapt_error(model, self.family, f"text_config.layer_types {layer_types} does not name "
                                                  f"{', '.join(sorted(LAYER_TYPES))} per decoder layer")
        if len(linear_layers(layer_types)) == len(layer_types):
            raise adapt_error(model, self.family, "no full-attention layer in the LLM")
        return Qwen35Adapter(**self.fields(model, llm), layer_types=layer_types)


__all__ = ["MODEL_TYPES", "Qwen35Adapter", "Qwen35Factory"]
