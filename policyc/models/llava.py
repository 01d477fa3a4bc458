"""LLaVA (`LlavaForConditionalGeneration`) with a CLIP or a SigLIP vision tower.

Everything is found by structure: the vision tower is the sub-model whose config is the vision
config, its layers are the one `nn.ModuleList` inside it, the decoder comes from `get_decoder()`.
(transformers 5.2 nests the CLIP layers under `vision_tower.vision_model.encoder`, 5.24 under
`vision_tower.encoder`; neither path is written here.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.base import AdapterFactory, ModelAdapter, register_adapter
from policyc.models.structure import adapt_error, image_token, language_model, vision_encoder

VISION_TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}


def _fail(model: nn.Module, what: str) -> PolicyError:
    return adapt_error(model, "llava", what)


def _projector(base: nn.Module, exclude: tuple[nn.Module, ...]) -> nn.Module | None:
    """The multimodal projector: the child of the LLaVA body that is neither tower nor language model."""
    candidates = [m for m in base.children() if "Projector" in type(m).__name__]
    if len(candidates) != 1:
        candidates = [m for m in base.children() if all(m is not e for e in exclude)]
    return candidates[0] if len(candidates) == 1 else None


def _grid(vision_config: Any) -> tuple[int, int]:
    size, patch = vision_config.image_size, vision_config.patch_size
    rows, cols = (size, size) if isinstance(size, int) else tuple(size)
    prow, pcol = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return rows // prow, cols // pcol


@register_adapter
class LlavaFactory(AdapterFactory):
    """LlavaForConditionalGeneration with a CLIP or SigLIP vision tower."""

    family = "llava"
    description = "LlavaForConditionalGeneration with a CLIP or SigLIP vision tower"

    def matches(self, model: nn.Module) -> bool:
        from transformers import LlavaForConditionalGeneration

        vision = getattr(getattr(model, "config", None), "vision_config", None)
        return isinstance(model, LlavaForConditionalGeneration) and getattr(vision, "model_type", None) in VISION_TOWERS

    def build(self, model: nn.Module) -> ModelAdapter:
        config = model.config
        vision_config = config.vision_config

        encoder = vision_encoder(model, self.family)
        tower, vision_layers = encoder["vision_tower"], encoder["vision_layers"]

        llm = language_model(model, self.family)

        base = next((m for m in model.children() if any(c is tower for c in m.children())), model)
        projector = _projector(base, (tower, llm["decoder"]))
        if projector is None:
            raise _fail(model, "no multimodal projector found")

        has_cls = any(isinstance(getattr(m, "class_embedding", None), torch.Tensor) for m in tower.modules())
        feature_layer = _feature_layer(config, len(vision_layers))
        strategy = getattr(config, "vision_feature_select_strategy", None)
        if strategy not in ("default", "full"):
            raise PolicyError.at(f"unsupported vision_feature_select_strategy {strategy!r}", None,
                                 "LLaVA knows 'default' (drop the first encoder token) and 'full' (keep all)")
        feature_start = 1 if strategy == "default" else 0
        grid = _grid(vision_config)
        tokens = grid[0] * grid[1] + int(has_cls) - feature_start

        return ModelAdapter(
            family=self.family,
            model=model,
            has_cls=has_cls,
            feature_layer=feature_layer,
            feature_start=feature_start,
            keeps_cls_in_features=has_cls and feature_start == 0,
            patch_grid=grid,
            projector=projector,
            image_token_id=image_token(model, self.family),
            tokens_per_image=tokens,
            **encoder,
            **llm,
        )


def _feature_layer(config: Any, num_layers: int) -> int:
    """`vision_feature_layer` as a non-negative index into the encoder's `num_layers + 1` hidden states."""
    layer = config.vision_feature_layer
    if isinstance(layer, list | tuple):
        raise PolicyError.at(f"vision_feature_layer {list(layer)} selects several encoder layers", None,
                             "multi-layer feature selection is not supported yet; use a model with one feature layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not -(num_layers + 1) <= layer <= num_layers:
        raise PolicyError.at(f"vision_feature_layer {layer!r} is not a hidden state of a {num_layers}-layer encoder",
                             None, f"valid: -{num_layers + 1}..{num_layers}")
    return layer % (num_layers + 1)


__all__ = ["VISION_TOWERS", "LlavaFactory"]
