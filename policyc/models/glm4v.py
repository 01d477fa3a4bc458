"""GLM-4.1V-Thinking and GLM-4.5V (`Glm4vForConditionalGeneration`, `Glm4vMoeForConditionalGeneration`).

What differs from Qwen2-VL (models/qwen2_vl.py, whose inputs, image layouts and packed-tower handling this reuses):
- The tower (`Glm4vVisionModel`) packs every image like Qwen2-VL's (frames attend within themselves, 2-D rotary,
  4 consecutive rows per 2x2 group), adds a learned position grid resampled per image, and after its blocks runs
  `post_layernorm` -> `downsample` (a Conv2d, kernel = stride = 2, on each group of 4 rows) -> `merger` (a GLU
  MLP on one row per LLM token). Its `last_hidden_state` is the downsampled output, not the blocks' output, so ToMe
  unmerges the blocks' output itself, before `post_layernorm` (`unmerge_after_blocks`, runtime/qwen_tower.py).
- Video frames reuse the image placeholder `<|image|>` (each frame group followed by its timestamp text); only the
  processor's `mm_token_type_ids` (2 on video tokens) tells them apart. Every visual token is one the LLM stages
  see; a projector stage sees a video's frame groups as images of their own (the tower receives them so), which is
  why `merge temporal` fails at compile time here (`reads_video_frames` is False).
- The LLM's rotary is chunked M-RoPE (`mrope_section` [8, 12, 12] on the released models) on part of each head
  (`partial_rotary_factor` 0.5), pairs rotated GPT-J style; the layer wrappers take the model's (cos, sin) as they
  are. GLM-4.1V's decoder layers add sandwich norms; GLM-4.5V routes tokens to DeepSeek-style experts. Neither
  adds features between layers (no DeepStack), so LLM stages run as on Qwen2-VL with `rope="mrope"`: a kept token
  keeps its 3-D position and dropping leaves no gap to close.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from policyc.models.base import ModelAdapter, register_adapter
from policyc.models.qwen2_vl import QwenVLAdapter, QwenVLFactory
from policyc.models.structure import adapt_error

if TYPE_CHECKING:
    from policyc.runtime.row_folds import RowFold

MODEL_TYPES = {"glm4v": "GLM-4.1V", "glm4v_moe": "GLM-4.5V"}


@dataclass(frozen=True, eq=False)
class Glm4vAdapter(QwenVLAdapter):
    """A GLM-4.1V/4.5V adapter: Qwen2-VL's, with the tower's blocks unmerged before `post_layernorm`."""

    # runtime/qwen_tower.py: merged rows are unmerged at the last block's output (the downsample conv reads them)
    unmerge_after_blocks: bool = True

    def describe(self) -> str:
        return f"{super().describe()}\nconnector: post_layernorm -> downsample (2x2 Conv2d) -> merger"

    def hook_llm_rows(self, rows: Callable[[], torch.Tensor | None],
                      folds: Callable[[], Sequence[RowFold]] | None = None) -> Callable[[], None] | None:
        """GLM-4.5V's text model hands every decoder layer its 3-D M-RoPE ids ([3, B, L] `position_ids`), which the
        layer passes to its attention unread (the rotary comes as `position_embeddings`); policyc's row gathers
        expect [B, L] ids, so the layers (policyc's wrappers, installed before this hook) do not receive them."""
        def without_mrope_ids(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple | None:
            ids = kwargs.get("position_ids")
            if isinstance(ids, torch.Tensor) and ids.dim() == 3:
                return args, {k: v for k, v in kwargs.items() if k != "position_ids"}
            return None

        handles = [layer.register_forward_pre_hook(without_mrope_ids, with_kwargs=True)
                   for layer in self.decoder_layers]

        def undo() -> None:
            for handle in handles:
                handle.remove()

        return undo


@register_adapter
class Glm4vFactory(QwenVLFactory):
    """GLM-4.1V and GLM-4.5V: encoder merges, projector and LLM stages, decode cache policies."""

    family = "glm4v"
    description = "GLM-4.1V and GLM-4.5V (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset(MODEL_TYPES)

    def build(self, model: nn.Module) -> ModelAdapter:
        base = super().build(model)
        tower = base.vision_tower
        for part in ("post_layernorm", "downsample"):
            if not isinstance(getattr(tower, part, None), nn.Module):
                raise adapt_error(model, self.family, f"no {part} after the vision blocks")
        fields = {name: getattr(base, name) for name in base.__dataclass_fields__}
        return Glm4vAdapter(**fields | {"reads_video_frames": False})


__all__ = ["MODEL_TYPES", "Glm4vAdapter", "Glm4vFactory"]
