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

VISION_TOWERS = {"clip_vision_model": "CLIP", "siglip_vision_model": "SigLIP"}


def _fail(model: nn.Module, what: str) -> PolicyError:
    return PolicyError.at(f"cannot adapt {type(model).__name__}: {what}", None,
                          "the model's structure differs from what the llava adapter expects")


def _int(config: Any, *names: str) -> int | None:
    """The first of `names` that `config` sets to an int."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _sub_model(model: nn.Module, config: Any) -> nn.Module | None:
    """The outermost sub-module (not `model`) built from `config`, matched by its model_type."""
    model_type = getattr(config, "model_type", None)
    for _, module in model.named_modules():
        if module is not model and getattr(getattr(module, "config", None), "model_type", None) == model_type:
            return module
    return None


def _layer_list(root: nn.Module, count: int | None) -> nn.ModuleList | None:
    """The one `nn.ModuleList` under `root` holding `count` layers (None when there is not exactly one)."""
    found = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and (count is None or len(m) == count)]
    return found[0] if len(found) == 1 else None


def _attention(layer: nn.Module) -> nn.Module | None:
    """A layer's self-attention module: `self_attn`, else its one child whose class name ends in Attention."""
    module = getattr(layer, "self_attn", None)
    if isinstance(module, nn.Module):
        return module
    found = [m for m in layer.children() if type(m).__name__.endswith("Attention")]
    return found[0] if len(found) == 1 else None


def _rotary(decoder: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The decoder's shared rotary embedding (outside the layers), found by class name or `inv_freq`."""
    inside = {id(m) for m in layers.modules()}
    for module in decoder.modules():
        if id(module) not in inside and ("Rotary" in type(module).__name__ or hasattr(module, "inv_freq")):
            return module
    return None


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
        vision_config, text_config = config.vision_config, config.text_config

        tower = _sub_model(model, vision_config)
        if tower is None:
            raise _fail(model, f"no {vision_config.model_type} vision tower found")
        vision_layers = _layer_list(tower, vision_config.num_hidden_layers)
        if vision_layers is None:
            raise _fail(model, f"no single list of {vision_config.num_hidden_layers} encoder layers in the tower")
        vision_attention = tuple(_attention(layer) for layer in vision_layers)

        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if not isinstance(decoder, nn.Module):
            decoder = _sub_model(model, text_config)
        if decoder is None:
            raise _fail(model, "no language model found")
        layers = getattr(decoder, "layers", None)
        decoder_layers = layers if isinstance(layers, nn.ModuleList) else _layer_list(decoder, None)
        if decoder_layers is None or len(decoder_layers) != text_config.num_hidden_layers:
            raise _fail(model, f"no list of {text_config.num_hidden_layers} decoder layers in {type(decoder).__name__}")
        decoder_attention = tuple(_attention(layer) for layer in decoder_layers)
        if any(a is None for a in vision_attention + decoder_attention):
            raise _fail(model, "a layer without a self-attention module")

        base = next((m for m in model.children() if any(c is tower for c in m.children())), model)
        projector = _projector(base, (tower, decoder))
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

        image_token_id = _int(config, "image_token_id", "image_token_index")
        if image_token_id is None:
            raise _fail(model, "the config has no image_token_id")
        num_heads = text_config.num_attention_heads
        vision_heads = vision_config.num_attention_heads
        return ModelAdapter(
            family=self.family,
            model=model,
            vision_tower=tower,
            vision_layers=vision_layers,
            vision_attention=vision_attention,  # type: ignore[arg-type]
            has_cls=has_cls,
            feature_layer=feature_layer,
            feature_start=feature_start,
            keeps_cls_in_features=has_cls and feature_start == 0,
            patch_grid=grid,
            projector=projector,
            decoder=decoder,
            decoder_layers=decoder_layers,
            decoder_attention=decoder_attention,  # type: ignore[arg-type]
            rotary=_rotary(decoder, decoder_layers),
            num_heads=num_heads,
            num_kv_heads=_int(text_config, "num_key_value_heads") or num_heads,
            head_dim=_int(text_config, "head_dim") or text_config.hidden_size // num_heads,
            hidden_size=text_config.hidden_size,
            vision_num_heads=vision_heads,
            vision_head_dim=_int(vision_config, "head_dim") or vision_config.hidden_size // vision_heads,
            image_token_id=image_token_id,
            tokens_per_image=tokens,
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
