"""Qwen3-VL and Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`).

What differs from Qwen2-VL (models/qwen2_vl.py, whose inputs, M-RoPE handling and packed tower this reuses):
- DeepStack (arXiv:2406.04334): after vision blocks `deepstack_visual_indexes` the tower folds its patches through a
  merger of their own (`deepstack_merger_list[k]`, one LLM-sized feature per merged token, aligned with the main
  merger's), and the text model adds level k's features to the visual positions of LLM layer k's output
  (`_deepstack_process`, layers 0..2 on the released models). A token dropped before the LLM or in those layers
  must lose its DeepStack features too: `hook_llm_rows` hands the text model's add the features of exactly the rows
  still alive (`ModelAdapter.hook_llm_rows`). LLM stages act on a layer's output before its DeepStack add.
- Merges that change a token's value before the LLM or in the DeepStack layers would have to fold every DeepStack
  level alike, which the runtime does not do yet: those fail at compile time (runtime/support.py).
- ToMe in the tower: each DeepStack merger reads the patches unmerged, as the main merger does (runtime/qwen_tower.py).
- The tower has no windows (every block attends within its frame); the LLM's rotary is interleaved M-RoPE, which the
  layer wrappers take from the model as it is, and `mm_token_type_ids` is required (`sample_inputs` passes it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.base import ModelAdapter, register_adapter
from policyc.models.qwen2_vl import QwenVLAdapter, QwenVLFactory
from policyc.models.structure import adapt_error

MODEL_TYPES = {"qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}


@dataclass(frozen=True, eq=False)
class Qwen3VLAdapter(QwenVLAdapter):
    """A Qwen3-VL adapter: Qwen2-VL's, plus the DeepStack features that follow the rows still alive."""

    def describe(self) -> str:
        count = self.deepstack_layers
        levels = f"DeepStack after LLM layers 0..{count - 1}" if count else "no DeepStack"
        return f"{super().describe()}\ndeepstack: {levels}"

    def hook_llm_rows(self, rows: Callable[[], torch.Tensor | None]) -> Callable[[], None] | None:
        """Replaces the text model's `_deepstack_process(hidden [B, L', D], visual_pos_masks [B, L],
        embeds [V, D])` with one that adds to the rows alive (`rows()`: [B, L'] prompt positions) the features of
        exactly those visual positions: each visual position's feature row is its rank among the mask's True
        entries (row-major, as the model scatters them)."""
        from policyc.runtime.patching import replace_attribute  # (the runtime package imports the adapters)

        decoder = self.decoder
        original = decoder._deepstack_process

        def deepstack_of_kept_rows(hidden: torch.Tensor, visual_pos_masks: torch.Tensor,
                                   visual_embeds: torch.Tensor) -> torch.Tensor:
            if hidden.shape[1] == visual_pos_masks.shape[1]:  # every row alive
                return original(hidden, visual_pos_masks, visual_embeds)
            kept = rows()
            if kept is None or kept.shape != hidden.shape[:2]:
                raise PolicyError.at(f"DeepStack features for {hidden.shape[1]} LLM rows of a "
                                     f"{visual_pos_masks.shape[1]}-token prompt, but policyc's runtime does not know "
                                     "which rows are alive", None, "please report this model and policy")
            mask = visual_pos_masks.to(kept.device)
            order = mask.flatten().cumsum(0).view_as(mask) - 1  # [B, L] each visual position's feature row
            alive = mask.gather(1, kept)
            return original(hidden, alive, visual_embeds[order.gather(1, kept)[alive].to(visual_embeds.device)])

        return replace_attribute(decoder, "_deepstack_process", deepstack_of_kept_rows)


@register_adapter
class Qwen3VLFactory(QwenVLFactory):
    """Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's stages, with DeepStack features kept for exactly the kept tokens."""

    family = "qwen3_vl"
    description = "Qwen3-VL and Qwen3-VL-MoE (DeepStack; encoder merges, projector, LLM and decode stages)"
    model_types = frozenset(MODEL_TYPES)

    def build(self, model: nn.Module) -> ModelAdapter:
        base = super().build(model)
        tower, decoder = base.vision_tower, base.decoder
        levels = list(getattr(tower.config, "deepstack_visual_indexes", None) or ())
        mergers = [m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) == len(levels)
                   and m is not base.vision_layers and all(type(x) is type(base.projector) for x in m)]
        if levels and len(mergers) != 1:
            raise adapt_error(model, self.family, f"no single list of {len(levels)} DeepStack mergers in the tower")
        if levels and not callable(getattr(decoder, "_deepstack_process", None)):
            raise adapt_error(model, self.family, "the text model has no DeepStack step (_deepstack_process)")
        if len(levels) > len(base.decoder_layers):
            raise adapt_error(model, self.family, f"{len(levels)} DeepStack levels for {len(base.decoder_layers)} "
                                                  "LLM layers")
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
        return Qwen3VLAdapter(**fields | {"deepstack_mergers": tuple(mergers[0]) if levels else ()})


__all__ = ["MODEL_TYPES", "Qwen3VLAdapter", "Qwen3VLFactory"]
