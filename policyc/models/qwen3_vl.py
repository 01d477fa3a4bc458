"""Qwen3-VL and Qwen3-VL-MoE (`Qwen3VLForConditionalGeneration`, `Qwen3VLMoeForConditionalGeneration`).

What differs from Qwen2-VL (models/qwen2_vl.py, whose inputs, M-RoPE handling and packed tower this reuses):
- DeepStack (arXiv:2406.04334): after vision blocks `deepstack_visual_indexes` the tower folds its patches through a
  merger of their own (`deepstack_merger_list[k]`, one LLM-sized feature per merged token, aligned with the main
  merger's), and the text model adds level k's features to the visual positions of LLM layer k's output
  (`_deepstack_process`, layers 0..2 on the released models). A token dropped before the LLM or in those layers
  must lose its DeepStack features too: `hook_llm_rows` hands the text model's add the features of exactly the rows
  still alive (`ModelAdapter.hook_llm_rows`). LLM stages act on a layer's output before its DeepStack add.
- Merges fold every DeepStack level alike: a merged token's DeepStack row is the same combination of its members'
  rows (`_folded_levels` says why). At projector.output each level rides along with the tokens (runtime/vision.py
  `_on_packed_tower`); LLM merges at layers 0..n-1 are replayed on the levels still to be added (`folds()`).
- ToMe in the tower: each DeepStack merger reads the patches unmerged, as the main merger does (runtime/qwen_tower.py).
- The tower has no windows (every block attends within its frame); the LLM's rotary is interleaved M-RoPE, which the
  layer wrappers take from the model as it is, and `mm_token_type_ids` is required (`sample_inputs` passes it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.base import ModelAdapter, register_adapter
from policyc.models.qwen2_vl import QwenVLAdapter, QwenVLFactory
from policyc.models.structure import adapt_error

if TYPE_CHECKING:
    from policyc.runtime.row_folds import RowFold

MODEL_TYPES = {"qwen3_vl": "Qwen3-VL", "qwen3_vl_moe": "Qwen3-VL-MoE"}


@dataclass(frozen=True, eq=False)
class Qwen3VLAdapter(QwenVLAdapter):
    """A Qwen3-VL adapter: Qwen2-VL's, plus the DeepStack features that follow the rows still alive."""

    def describe(self) -> str:
        count = self.deepstack_layers
        levels = f"DeepStack after LLM layers 0..{count - 1}" if count else "no DeepStack"
        return f"{super().describe()}\ndeepstack: {levels}"

    def hook_llm_rows(self, rows: Callable[[], torch.Tensor | None],
                      folds: Callable[[], Sequence[RowFold]] | None = None) -> Callable[[], None] | None:
        """Replaces the text model's `_deepstack_process(hidden [B, L', D], visual_pos_masks [B, L],
        embeds [V, D])` with one that adds to the rows alive (`rows()`: [B, L'] prompt positions) the features of
        exactly those visual positions: each visual position's feature row is its rank among the mask's True
        entries (row-major, as the model scatters them). After LLM merges (`folds()`), the features are first
        folded as the rows were (`_folded_levels`)."""
        from policyc.runtime.patching import replace_attribute  # (the runtime package imports the adapters)

        decoder = self.decoder
        original = decoder._deepstack_process

        def deepstack_of_kept_rows(hidden: torch.Tensor, visual_pos_masks: torch.Tensor,
                                   visual_embeds: torch.Tensor) -> torch.Tensor:
            merged = list(folds()) if folds is not None else []
            if hidden.shape[1] == visual_pos_masks.shape[1] and not merged:  # every row alive, none merged
                return original(hidden, visual_pos_masks, visual_embeds)
            kept = rows()
            if kept is None or kept.shape != hidden.shape[:2]:
                raise PolicyError.at(f"DeepStack features for {hidden.shape[1]} LLM rows of a "
                                     f"{visual_pos_masks.shape[1]}-token prompt, but policyc's runtime does not know "
                                     "which rows are alive", None, "please report this model and policy")
            mask = visual_pos_masks.to(kept.device)
            if merged:
                receives, features = _folded_levels(mask, visual_embeds.to(kept.device), merged, kept)
                return original(hidden, receives, features)
            order = mask.flatten().cumsum(0).view_as(mask) - 1  # [B, L] each visual position's feature row
            alive = mask.gather(1, kept)
            return original(hidden, alive, visual_embeds[order.gather(1, kept)[alive].to(visual_embeds.device)])

        return replace_attribute(decoder, "_deepstack_process", deepstack_of_kept_rows)


def _folded_levels(mask: torch.Tensor, embeds: torch.Tensor, folds: Sequence[RowFold], kept: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DeepStack level after the prefill's LLM merges: which rows `kept` [B, L'] receive features ([B, L'] bool)
    and those features in row-major order ([R, D]).

    DeepStack's authors (arXiv:2406.04334) merge no tokens: every visual token gets its own feature at each level.
    A merge combines rows linearly (VisionDrop's receiver plus the mean of what folds in, SparseVLM's cluster mean),
    so the natural rule is that a merged token's DeepStack row is the same combination of its members' rows: then
    merging before the add equals merging after it (the combination of h + d is the combination of h plus that of
    d), and every later level treats the merged token as the tokens it stands for. The features are laid on prompt
    positions (zero on text, [B, L, D]) and each merge is replayed there in order (runtime/row_folds.py); a row
    receives features where its group held a visual token (a visual indicator folded alike is non-zero)."""
    from policyc.runtime.row_folds import replay  # (the runtime package imports the adapters)

    table = torch.zeros(*mask.shape, embeds.shape[-1], dtype=embeds.dtype, device=embeds.device)
    table[mask] = embeds  # row-major, as the model scatters them
    table = replay(torch.cat([table, mask[:, :, None].to(embeds.dtype)], dim=-1), folds)
    rows = table.gather(1, kept[:, :, None].expand(-1, -1, table.shape[-1]))
    receives = rows[:, :, -1] != 0
    return receives, rows[:, :, :-1][receives]


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
