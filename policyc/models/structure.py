"""Finding a model's parts by structure (module classes, `nn.ModuleList`s, config fields), shared by the
family adapters: never one transformers version's attribute paths, so the same code runs on 5.17 and 5.24.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from policyc.errors import PolicyError

LINEAR_ATTENTION = "linear_attention"  # a hybrid LLM's layer type without attention (transformers' name)


def adapt_error(model: nn.Module, family: str, what: str) -> PolicyError:
    """The error of a model whose structure is not what `family`'s adapter expects."""
    return PolicyError.at(f"cannot adapt {type(model).__name__}: {what}", None,
                          f"the model's structure differs from what the {family} adapter expects")


def config_int(config: Any, *names: str) -> int | None:
    """The first of `names` that `config` sets to an int."""
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def sub_model(model: nn.Module, config: Any) -> nn.Module | None:
    """The outermost sub-module (not `model`) built from `config`, matched by its model_type."""
    model_type = getattr(config, "model_type", None)
    for _, module in model.named_modules():
        if module is not model and getattr(getattr(module, "config", None), "model_type", None) == model_type:
            return module
    return None


def layer_list(root: nn.Module, count: int | None) -> nn.ModuleList | None:
    """The one `nn.ModuleList` under `root` holding `count` layers (None when there is not exactly one)."""
    found = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
             and (count is None or len(m) == count)]
    return found[0] if len(found) == 1 else None


def attention_of(layer: nn.Module) -> nn.Module | None:
    """A layer's self-attention module: `self_attn`, else its one child whose class name ends in Attention."""
    module = getattr(layer, "self_attn", None)
    if isinstance(module, nn.Module):
        return module
    found = [m for m in layer.children() if type(m).__name__.endswith("Attention")]
    return found[0] if len(found) == 1 else None


def linear_layers(layer_types: tuple[str, ...]) -> tuple[int, ...]:
    """The decoder layers whose token mixer is a linear recurrence (Qwen3.5's Gated DeltaNet, `linear_attention`
    in `layer_types`): no attention weights, no KV cache, a fixed-size state instead."""
    return tuple(k for k, kind in enumerate(layer_types) if kind == LINEAR_ATTENTION)


def rotary_of(decoder: nn.Module, layers: nn.ModuleList) -> nn.Module | None:
    """The decoder's shared rotary embedding (outside the layers), found by class name or `inv_freq`."""
    inside = {id(m) for m in layers.modules()}
    for module in decoder.modules():
        if id(module) not in inside and ("Rotary" in type(module).__name__ or hasattr(module, "inv_freq")):
            return module
    return None


def language_model(model: nn.Module, family: str, mixer: str | None = None) -> dict[str, Any]:
    """The `ModelAdapter` fields of the LLM: decoder, its layers and their attention, the rotary embedding
    and the attention shapes, read from `model.config.text_config`. `mixer`: the attribute of the token mixer that
    stands in for attention in layers without one (Qwen3.5's Gated DeltaNet layers: "linear_attn")."""
    text_config = model.config.text_config
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, nn.Module):
        decoder = sub_model(model, text_config)
    if decoder is None:
        raise adapt_error(model, family, "no language model found")
    layers = getattr(decoder, "layers", None)
    decoder_layers = layers if isinstance(layers, nn.ModuleList) else layer_list(decoder, None)
    if decoder_layers is None or len(decoder_layers) != text_config.num_hidden_layers:
        raise adapt_error(model, family, f"no list of {text_config.num_hidden_layers} decoder layers in "
                                         f"{type(decoder).__name__}")
    decoder_attention = tuple(attention_of(layer) or (getattr(layer, mixer, None) if mixer else None)
                              for layer in decoder_layers)
    if any(not isinstance(a, nn.Module) for a in decoder_attention):
        raise adapt_error(model, family, "a decoder layer without a self-attention module")
    num_heads = text_config.num_attention_heads
    return {
        "decoder": decoder,
        "decoder_layers": decoder_layers,
        "decoder_attention": decoder_attention,
        "rotary": rotary_of(decoder, decoder_layers),
        "num_heads": num_heads,
        "num_kv_heads": config_int(text_config, "num_key_value_heads") or num_heads,
        "head_dim": config_int(text_config, "head_dim") or text_config.hidden_size // num_heads,
        "hidden_size": text_config.hidden_size,
    }


def vision_encoder(model: nn.Module, family: str) -> dict[str, Any]:
    """The `ModelAdapter` fields of the vision encoder: the tower built from `model.config.vision_config`, its one
    list of layers (`depth` or `num_hidden_layers` long), each layer's attention, and the attention shapes."""
    vision_config = model.config.vision_config
    tower = sub_model(model, vision_config)
    if tower is None:
        raise adapt_error(model, family, f"no {vision_config.model_type} vision tower found")
    depth = config_int(vision_config, "depth", "num_hidden_layers")
    layers = layer_list(tower, depth)
    if layers is None:
        raise adapt_error(model, family, f"no single list of {depth} encoder layers in the tower")
    attention = tuple(attention_of(layer) for layer in layers)
    if any(a is None for a in attention):
        raise adapt_error(model, family, "an encoder layer without a self-attention module")
    heads = config_int(vision_config, "num_heads", "num_attention_heads") or 1
    width = config_int(vision_config, "embed_dim", "hidden_size") or 0  # Qwen2-VL: embed_dim is the encoder's
    return {"vision_tower": tower, "vision_layers": layers, "vision_attention": attention,
            "vision_num_heads": heads, "vision_head_dim": config_int(vision_config, "head_dim") or width // heads}


def image_token(model: nn.Module, family: str) -> int:
    """The config's image placeholder id (`image_token_id`, or `image_token_index` on older configs)."""
    image_token_id = config_int(model.config, "image_token_id", "image_token_index")
    if image_token_id is None:
        raise adapt_error(model, family, "the config has no image_token_id")
    return image_token_id


__all__ = ["LINEAR_ATTENTION", "adapt_error", "attention_of", "config_int", "image_token", "language_model",
           "layer_list", "linear_layers", "rotary_of", "sub_model", "vision_encoder"]
