"""Gemma 3 (`Gemma3ForConditionalGeneration`, arXiv:2503.19786).

What differs from LLaVA:
- a SigLIP tower without CLS; the projector average-pools its patch grid (64x64 -> 16x16 in the released models)
  to `mm_tokens_per_image` tokens, normalises and projects them;
- the prompt frames each image's `<image_soft_token>` run with `<start_of_image>` / `<end_of_image>`, and the
  inputs carry `token_type_ids` (1 on image tokens);
- in the LLM, the tokens of one image attend to each other BOTH ways (a bidirectional block over the image's
  run), everything else causally;
- local layers attend within a sliding window (`sliding_window`, 1024 in the released models) and use their own
  rotary base (10k); every `sliding_window_pattern`-th layer is global (rotary base 1M);
- the attention queries and keys are RMS-normalised per head (`q_norm`, `k_norm`) before the rotary embedding.

How policyc handles it: the decoder takes a mapping of masks per layer type; the runtime keeps the prefill's
mapping and gathers the kept rows and columns of each layer's own mask, so after a drop kept image tokens still
see each other both ways and the sliding windows count ORIGINAL positions (a pruned layer attends to the kept
subset of what the unmodified layer attends to). Attention signals (`attention(last -> vision)`, H2O's and
SnapKV's votes) read each layer's own mask. Sliding-window cache layers become whole-sequence layers before a
prefill (the windows then act through the masks), so dropped rows and per-head evictions map back to positions.
Renumbered positions use the layer's own rotary embedding.

Encoder merges (ToMe) run in the SigLIP tower on the live rows and are undone at its output (each patch takes the
value of the token it was merged into), so the projector's pooling sees the full grid and the LLM the model's own
`mm_tokens_per_image` tokens: the encoder saves compute only. Encoder drops are not bound (the projector's pooling
needs every patch).

Projector stages run on the projector's output, per image: its `mm_tokens_per_image` tokens tile one square grid
(`token_grid`, 16x16 in the released models), so `grid`, `pool` and the other geometric operators read that grid,
and MMTok's image coverage reads the pooled patches behind each token (`projector_input_tokens`). The LLM drops the
tokens not kept at its input; the kept tokens of an image still see each other both ways (each decoder layer gets
the kept rows and columns of its own mask; sliding windows count ORIGINAL positions, as after LLM-stage drops).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.base import AdapterFactory, ModelAdapter, example_pixels, placement, register_adapter, text_around
from policyc.models.layout import ImageLayout, fixed_size_layouts
from policyc.models.structure import (
    adapt_error,
    config_int,
    image_token,
    language_model,
    vision_encoder,
)


@dataclass(frozen=True, eq=False)
class Gemma3Adapter(ModelAdapter):
    """A Gemma 3 adapter: calibration inputs carry `token_type_ids`; rotary embeddings are per layer type."""

    begin_image_id: int | None = None  # <start_of_image>
    end_image_id: int | None = None  # <end_of_image>

    def position_embeddings(self, index: int, hidden: torch.Tensor,
                            position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of decoder layer `index`'s rotary embedding (local or global) at `position_ids` [B, n]."""
        assert self.rotary is not None  # build() requires it
        return self.rotary(hidden, position_ids, self.layer_types[index])

    @property
    def token_grid(self) -> tuple[int, int] | None:
        """The square grid the `mm_tokens_per_image` tokens of an image tile (the pooled patch grid)."""
        assert self.tokens_per_image is not None  # fixed by mm_tokens_per_image
        side = math.isqrt(self.tokens_per_image)
        return (side, side) if side * side == self.tokens_per_image else None

    def projector_input_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """The encoder patches behind each LLM token: the projector's input [I, P, E] average-pooled as the projector
        pools it, [I, N, E] (before its norm and projection)."""
        images, patches, channels = features.shape
        side = math.isqrt(patches)
        grid = features.transpose(1, 2).reshape(images, channels, side, side)
        return self.projector.avg_pool(grid).flatten(2).transpose(1, 2)

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of row `row` ([3, H, W] each, as the encoder saw it) and the grid its pooled tokens tile,
        row-major."""
        grid = self.token_grid
        if grid is None:
            raise NotImplementedError("mm_tokens_per_image is not a square: the pooled tokens tile no grid")
        return fixed_size_layouts(self, inputs, row, grid)

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """`text_tokens` text ids around `<start_of_image>`, one image's tokens and `<end_of_image>`, with
        `token_type_ids` as the Gemma 3 processor returns them, and the example image at the encoder's size."""
        assert self.tokens_per_image is not None  # fixed by mm_tokens_per_image
        framed = [i for i in (self.begin_image_id,) if i is not None] + [self.image_token_id] * self.tokens_per_image
        framed += [i for i in (self.end_image_id,) if i is not None]
        device, dtype = placement(self.model)
        input_ids = torch.tensor([text_around(self, text_tokens, framed)], device=device)
        size = self.model.config.vision_config.image_size
        return {"input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "token_type_ids": (input_ids == self.image_token_id).long(),
                "pixel_values": example_pixels((size, size))[None].to(device=device, dtype=dtype)}


@register_adapter
class Gemma3Factory(AdapterFactory):
    """Gemma 3 with images: encoder merges, projector stages per image, LLM stages and decode cache policies."""

    family = "gemma3"
    description = "Gemma 3 (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset({"gemma3"})

    def build(self, model: nn.Module) -> ModelAdapter:
        config = model.config
        vision_config, text_config = config.vision_config, config.text_config
        encoder = vision_encoder(model, self.family)
        layers = encoder["vision_layers"]
        projectors = [m for m in model.modules() if type(m).__name__.endswith("MultiModalProjector")]
        if len(projectors) != 1:
            raise adapt_error(model, self.family, "no single multi-modal projector")
        llm = language_model(model, self.family)
        if llm["rotary"] is None:
            raise adapt_error(model, self.family, "no rotary embedding in the language model")
        if getattr(text_config, "attn_logit_softcapping", None) is not None:
            raise PolicyError.at("Gemma 3 with attention logit softcapping is not supported: policyc's attention "
                                 "scores would leave the softcap out", None,
                                 "the released Gemma 3 checkpoints set attn_logit_softcapping to null")
        image_token_id = image_token(model, self.family)
        side = vision_config.image_size // vision_config.patch_size
        return Gemma3Adapter(
            family=self.family,
            model=model,
            has_cls=False,
            feature_layer=len(layers),
            feature_start=0,
            keeps_cls_in_features=False,
            patch_grid=(side, side),
            projector=projectors[0],
            image_token_id=image_token_id,
            tokens_per_image=config.mm_tokens_per_image,
            encoder_patches_per_token=max(1, side * side // config.mm_tokens_per_image),
            encoder_unmerges=True,
            layer_types=tuple(text_config.layer_types),
            begin_image_id=config_int(config, "boi_token_id", "boi_token_index"),
            end_image_id=config_int(config, "eoi_token_id", "eoi_token_index"),
            **encoder,
            **llm,
        )


__all__ = ["Gemma3Adapter", "Gemma3Factory"]
