"""LLaVA-OneVision-1.5 (`LlavaOnevision15ForConditionalGeneration`): a RICE-ViT tower packed like Qwen2-VL's and a
plain Qwen3 LLM (arXiv:2509.23661).

What differs from Qwen2-VL (models/qwen2_vl.py, whose image layouts and packed-tower handling this reuses):
- The tower (`LlavaOnevision15VisionModel`) embeds 2-D patches (Conv2d, no temporal patch: `pixel_values` rows are
  3 * p * p wide), prepends a **CLS row to every frame** (`cu_seqlens` shifted by one per frame; the CLS has its own
  rotary angle), runs `pre_layernorm` and blocks that attend within their frame, then strips each frame's CLS row
  before the Qwen-style 2x2 merger. ToMe runs per frame with the CLS row in the frame's span but never merged
  (`frame_cls`), and the blocks' output is unmerged at the last block, before the strip (`unmerge_after_blocks`;
  runtime/qwen_tower.py).
- The CLS never reaches the LLM, and the packed encoder's stages do not read its attention yet, so CLS signals
  (FasterVLM, VisionZip's encoder stage) fail at compile time naming the substitutes (`visiondrop_llm`: VisionZip's
  dominant and contextual tokens picked in the LLM).
- The LLM takes 1-D positions (`arange`, no `get_rope_index` and no `mm_token_type_ids`), so `rope="1d"`: tokens
  dropped before the LLM close their gap like LLaVA's, and `positions compact` renumbers the kept rows.
- Placeholders are Qwen's: `<|vision_start|>`, `<|image_pad|>` * n, `<|vision_end|>`; videos `<|video_pad|>`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from policyc.errors import PolicyError, Span
from policyc.models.base import ModelAdapter, Requirement, register_adapter
from policyc.models.qwen2_vl import QwenVLAdapter, QwenVLFactory
from policyc.models.structure import adapt_error

MODEL_TYPES = {"llava_onevision1_5": "LLaVA-OneVision-1.5"}


@dataclass(frozen=True, eq=False)
class OneVision15Adapter(QwenVLAdapter):
    """A LLaVA-OneVision-1.5 adapter: Qwen2-VL's packed tower with a CLS row per frame, and a 1-D RoPE LLM."""

    # runtime/qwen_tower.py: unmerge at the last block (the tower strips the CLS rows from its output), CLS per frame
    unmerge_after_blocks: bool = True
    frame_cls: bool = True

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """Qwen2-VL's calibration inputs without `mm_token_type_ids` (OV-1.5's processor gives none)."""
        inputs = super().sample_inputs(text_tokens)
        del inputs["mm_token_type_ids"]
        return inputs

    def encoder_tokens(self, llm_tokens: int) -> int:
        """Encoder rows behind an image of `llm_tokens` LLM tokens: its patches and its frame's CLS row (the compile
        report's encoder FLOPs; ToMe's rows per block count the CLS row too)."""
        return llm_tokens * self.encoder_patches_per_token + 1

    def describe(self) -> str:
        return super().describe().replace(" (no CLS)", " + one CLS row per frame (stripped before the merger)")

    def check(self, requirements: Iterable[Requirement],
              stages: Iterable[tuple[str, str, Span | None]] = ()) -> None:
        """As every adapter's, except that a policy reading the CLS token learns that the tower has one per frame
        whose signals are not offered yet (rather than that it has none)."""
        requirements = list(requirements)
        cls = [r for r in requirements if r.what == "cls_token"]
        try:
            super().check([r for r in requirements if r.what != "cls_token"], stages)
            problems: list[PolicyError] = []
        except PolicyError as error:
            problems = [error]
        problems += [PolicyError.at(
            f"{r.reason}, but the CLS token of LLaVA-OneVision-1.5's tower (one per frame) never reaches the LLM and "
            "its packed encoder's stages do not read its attention yet", r.span,
            "rank by attention(last -> vision) in an LLM stage (FastV's signal), or use visiondrop_llm "
            "(VisionZip-style, in the LLM); tome merges in the encoder") for r in cls]
        if problems:
            raise PolicyError([d for p in problems for d in p.diagnostics])


@register_adapter
class OneVision15Factory(QwenVLFactory):
    """LLaVA-OneVision-1.5: encoder merges, projector and LLM stages, decode cache policies."""

    family = "llava_onevision1_5"
    description = "LLaVA-OneVision-1.5 (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset(MODEL_TYPES)

    def build(self, model: nn.Module) -> ModelAdapter:
        base = super().build(model)
        if not isinstance(getattr(base.vision_tower, "cls_embeddings", None), nn.Module):
            raise adapt_error(model, self.family, "no per-frame CLS embeddings in the vision tower")
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
        return OneVision15Adapter(**fields | {"rope": "1d", "temporal_patch_size": 1})


__all__ = ["MODEL_TYPES", "OneVision15Adapter", "OneVision15Factory"]
