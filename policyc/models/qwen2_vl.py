"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

What differs from LLaVA:
- no CLS token; a 2x2 patch merger after the encoder turns 4 patches into one LLM token;
- dynamic resolution: each image has its own patch grid (`image_grid_thw`), so the tokens per image vary;
- the LLM's positions are 3-D (M-RoPE: time, height, width). transformers 5.24 needs `mm_token_type_ids`
  next to `input_ids`, or it silently falls back to 1-D positions; `sample_inputs` passes it.
- Qwen2.5-VL's encoder attends within windows except in its full-attention blocks.

On M-RoPE a kept image token keeps its grid coordinates and text after an image starts after the image's
grid, not after its token count: dropping image tokens leaves no gap to close. `positions compact` and
`positions cache_length` therefore keep every position, as `positions original` does (docs/families.md's model
matrix says so).

`projector.output` stages run on the tower's merged tokens (its `pooler_output`, every image packed one after
another: policyc/runtime/vision.py pads them per image for the stages). Encoder stages merge (ToMe) inside the
packed encoder, per frame (Qwen2-VL) or per window (Qwen2.5-VL), and are unmerged before the 2x2 merger
(policyc/runtime/qwen_tower.py); encoder drops fail at compile time, as on the other families whose connector needs
every patch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from policyc.models.base import AdapterFactory, ModelAdapter, example_pixels, placement, register_adapter, text_around
from policyc.models.layout import ImageLayout, image_runs, images_before, layout_error, numbered, one_view
from policyc.models.structure import (
    adapt_error,
    config_int,
    image_token,
    language_model,
    vision_encoder,
)

MODEL_TYPES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL"}
SAMPLE_GRID = (8, 8)  # patches per side of the calibration image: 16 LLM tokens after the 2x2 merger


@dataclass(frozen=True, eq=False)
class QwenVLAdapter(ModelAdapter):
    """A Qwen2-VL adapter: its calibration inputs carry the image grid and the token types M-RoPE needs."""

    temporal_patch_size: int = 2
    patch_size: int = 14
    merge_size: int = 2

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """`text_tokens` text ids around the example image at `SAMPLE_GRID` patches, with `image_grid_thw`
        and `mm_token_type_ids` as the Qwen2-VL processor returns them."""
        rows, cols = SAMPLE_GRID
        tokens = rows * cols // self.merge_size**2
        ids = text_around(self, text_tokens, [self.image_token_id] * tokens)
        device, dtype = placement(self.model)
        input_ids = torch.tensor([ids], device=device)
        return {"input_ids": input_ids,
                "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == self.image_token_id).long(),
                "pixel_values": self.patchify(example_pixels((rows * self.patch_size, cols * self.patch_size)))
                .to(device=device, dtype=dtype),
                "image_grid_thw": torch.tensor([[1, rows, cols]], device=device)}

    def track_video_forwards(self, on_video: Callable[[bool], None]) -> Callable[[], None] | None:
        """Wraps the body's `get_video_features` (the module whose `visual` is the tower; its forward encodes images
        and videos in two calls of the tower): `on_video(True)` before, `on_video(False)` after."""
        from policyc.runtime.patching import replace_attribute  # (the runtime package imports the adapters)

        body = next((m for m in self.model.modules() if m is not self.model and getattr(m, "visual", None)
                     is self.vision_tower and hasattr(m, "get_video_features")), None)
        if body is None or self.video_token_id is None:
            return None
        video = body.get_video_features

        @functools.wraps(video)  # its signature: generate() reads which inputs it takes
        def video_marked(*args: Any, **kwargs: Any) -> Any:
            on_video(True)
            try:
                return video(*args, **kwargs)
            finally:
                on_video(False)

        return replace_attribute(body, "get_video_features", video_marked)

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of row `row`, rebuilt from its flattened patches ([3, H, W]), on its grid of LLM tokens
        (merged); `image_grid_thw` and `pixel_values` hold every row's images in order (videos apart)."""
        input_ids, grids = inputs["input_ids"], inputs["image_grid_thw"].cpu()
        first = images_before(self, input_ids, row)
        runs = image_runs(self, input_ids[row])
        if grids.shape[0] < first + len(runs):
            raise layout_error(f"the prompt has {first + len(runs)} images up to row {row} but image_grid_thw only "
                               f"{grids.shape[0]}")
        offset = int(grids[:first].prod(1).sum())
        layouts = []
        for k, (_, index, length) in enumerate(runs):
            frames, rows, cols = (int(v) for v in grids[first + k])
            m = self.merge_size
            if frames != 1 or rows * cols != length * m * m:
                raise layout_error(f"image {k + 1}'s {length} tokens do not tile its grid {frames}x{rows}x{cols}")
            picture = self.unpatchify(inputs["pixel_values"][offset:offset + rows * cols], rows, cols)
            offset += rows * cols
            layouts.append(one_view(numbered(k, len(runs)), picture, (rows // m, cols // m), index))
        return layouts

    def unpatchify(self, patches: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[3, rows * p, cols * p]: one image from its flattened patches [rows * cols, 3 * t * p * p] (`patchify`'s
        order, its first frame)."""
        p, m = self.patch_size, self.merge_size
        grouped = patches.reshape(rows // m, cols // m, m, m, -1, self.temporal_patch_size, p, p)[:, :, :, :, :, 0]
        return grouped.permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, rows * p, cols * p)

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """One image [3, H, W] (H, W multiples of patch x merge size) as the encoder's flattened patches,
        [H/p * W/p, 3 * t * p * p], ordered in 2x2 merge groups as the Qwen2-VL image processor orders them."""
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        channels, height, width = image.shape
        frames = image[None].expand(t, -1, -1, -1)  # a still image repeats over the temporal patch
        grid_h, grid_w = height // p, width // p
        patches = frames.reshape(1, t, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_h * grid_w, channels * t * p * p)


@register_adapter
class QwenVLFactory(AdapterFactory):
    """Qwen2-VL and Qwen2.5-VL: encoder merges, projector and LLM stages, decode cache policies."""

    family = "qwen2_vl"
    description = "Qwen2-VL and Qwen2.5-VL (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset(MODEL_TYPES)

    default_patch_size = 14  # pixels per patch side where the vision config does not say

    def build(self, model: nn.Module) -> ModelAdapter:
        return QwenVLAdapter(**self.fields(model, language_model(model, self.family)))

    def fields(self, model: nn.Module, llm: dict[str, Any]) -> dict[str, Any]:
        """The adapter's fields for a Qwen-VL-style model (packed tower with a 2x2 merger, M-RoPE LLM) whose
        language model's parts are `llm` (structure.language_model's)."""
        config = model.config
        vision_config = config.vision_config
        encoder = vision_encoder(model, self.family)
        merger = getattr(encoder["vision_tower"], "merger", None)
        if not isinstance(merger, nn.Module):
            raise adapt_error(model, self.family, "no patch merger in the vision tower")
        image_token_id = image_token(model, self.family)
        video_token_id = config_int(config, "video_token_id")
        merge = config_int(vision_config, "spatial_merge_size") or 2
        return dict(
            family=self.family,
            model=model,
            has_cls=False,
            feature_layer=len(encoder["vision_layers"]),
            feature_start=0,
            keeps_cls_in_features=False,
            patch_grid=None,
            projector=merger,
            image_token_id=image_token_id,
            tokens_per_image=None,
            rope="mrope",
            vision_token_ids=(image_token_id,) if video_token_id is None else (image_token_id, video_token_id),
            encoder_patches_per_token=merge * merge,
            encoder_unmerges=True,
            encoder_packed=True,
            reads_video_frames=True,  # grid_thw, read where the packed tower's output reaches projector.output
            temporal_patch_size=config_int(vision_config, "temporal_patch_size") or 2,
            patch_size=config_int(vision_config, "patch_size") or self.default_patch_size,
            merge_size=merge,
            **encoder,
            **llm,
        )


__all__ = ["MODEL_TYPES", "QwenVLAdapter", "QwenVLFactory"]
