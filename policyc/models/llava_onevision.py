"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres images on a SigLIP tower and a
Qwen2 LLM, with several images per prompt and videos.

What differs from LLaVA-NeXT (llava_next.py, whose `build_anyres` this adapter shares):
- SigLIP: no CLS token (CLS signals fail with a substitute), every patch reaches the projector ("full").
- anyres_max_N: when an image's unpadded crop features exceed N base views, they are interpolated down
  before the newline features are added. A prompt with several images (`batch_num_images` > 1) encodes each
  with its base view only, plus one newline.
- videos: every frame goes through the tower and the projector and is pooled 2x2 (bilinear, to ceil(h/2) x
  ceil(w/2) tokens); a video's frames follow each other and end with one `image_newline` feature, all on `<video>`
  placeholders (`video_token_id`). transformers 5.24 appends the newline in `get_video_features`, 5.17 after it.
- the `vision` set holds image and video placeholders: base views, crops, pooled frames and newlines.
- the LLM (Qwen2) uses 1-D RoPE and a causal mask, as LLaVA's.

Encoder merges run per encoder input (base view, crop, video frame) and are unmerged at the feature layer, as on
LLaVA-NeXT. Projector stages run per image on its packed tokens, newlines kept, as on LLaVA-NeXT (the anyres_max
interpolation included), and per video on its tokens as the LLM receives them (frame after frame, then the
newline): a video is one image to them, its newline no candidate and always kept, and each token knows its frame
and its place in the pooled grid (`merge temporal`). Images and videos are encoded in two forwards (images first);
each hands the LLM the flags of its own placeholders (runtime/image_samples.py `placeholder_flags`).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.base import AdapterFactory, ImageTokensHook, ModelAdapter, register_adapter
from policyc.models.llava_next import AnyresAdapter, build_anyres
from policyc.models.structure import config_int


@dataclass(frozen=True, eq=False)
class OnevisionAdapter(AnyresAdapter):
    """LLaVA-NeXT's anyres images, plus videos whose tokens projector stages read frame by frame."""

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """A video frame's tokens after `apply_pooling`'s 2x2 bilinear pooling of the tower's patch grid (rows,
        columns): ceil(h/2) x ceil(w/2), row-major."""
        rows, columns = self.encoder_grid or (0, 0)
        return math.ceil(rows / 2), math.ceil(columns / 2)

    def hook_image_tokens(self, on_tokens: ImageTokensHook) -> Callable[[], None] | None:
        """Images as LLaVA-NeXT's (`pack_image_features`); videos by wrapping the body's `get_video_features`: each
        video's tokens [frames * pooled + 1, D] go through `on_tokens` with the newline marked as no image feature
        and each token's frame and spatial index."""
        from policyc.runtime.patching import replace_attribute  # (the runtime package imports the adapters)

        undo_images = super().hook_image_tokens(on_tokens)
        video = getattr(self.body, "get_video_features", None)
        if video is None or self.video_token_id is None:
            return undo_images
        signature = inspect.signature(video)
        pixels_name = next(iter(signature.parameters))  # pixel_values_videos (5.24), pixel_values (5.17)

        @functools.wraps(video)  # its signature: generate() reads which inputs it takes
        def video_with_stages(*args: Any, **kwargs: Any) -> Any:
            output = video(*args, **{**kwargs, "return_dict": True})
            pixels = signature.bind(*args, **kwargs).arguments[pixels_name]  # [videos, frames, 3, H, W]
            output.pooler_output = self._video_tokens(output.pooler_output, int(pixels.shape[1]), on_tokens)
            return output.to_tuple() if kwargs.get("return_dict") is False else output

        undo_videos = replace_attribute(self.body, "get_video_features", video_with_stages)

        def remove() -> None:
            undo_videos()
            if undo_images is not None:
                undo_images()
        return remove

    def _video_tokens(self, features: torch.Tensor, frames: int, on_tokens: ImageTokensHook) -> torch.Tensor:
        """Each video's features [V, frames * pooled (+ 1 newline on 5.24), D] through `on_tokens` as the LLM
        receives them (the newline appended where transformers adds it later, and taken off again)."""
        per_frame = math.prod(self.pooled_grid)
        count = frames * per_frame
        with_newline = features.shape[1] - count
        if with_newline not in (0, 1):
            raise PolicyError.at(f"LLaVA-OneVision's video features hold {features.shape[1]} tokens per video for "
                                 f"{frames} frames of {per_frame} pooled tokens: a layout policyc does not know",
                                 None, "run the projector stages on images, or use an LLM stage for videos")
        tokens = features
        if not with_newline:  # transformers 5.17: the forward appends the newline after get_video_features
            newline = self.body.image_newline.to(features)  # type: ignore[union-attr]
            tokens = torch.cat([features, newline.expand(features.shape[0], 1, -1)], 1)
        positions = torch.arange(count + 1, device=features.device)
        image = positions < count
        frame = torch.where(image, positions // per_frame, -1)
        spot = torch.where(image, positions % per_frame, -1)
        videos = features.shape[0]
        out = torch.stack(on_tokens(list(tokens), [image] * videos, self.video_token_id, [frame] * videos,
                                    [spot] * videos))
        return out if with_newline else out[:, :count]


@register_adapter
class LlavaOnevisionFactory(AdapterFactory):
    """LLaVA-OneVision: encoder merges, projector stages per image and per video, LLM stages and decode cache
    policies."""

    family = "llava_onevision"
    description = "LlavaOnevisionForConditionalGeneration (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset({"llava_onevision"})

    def build(self, model: nn.Module) -> ModelAdapter:
        video = config_int(model.config, "video_token_id", "video_token_index")
        return build_anyres(model, self.family, video_token_id=video, adapter=OnevisionAdapter,
                            reads_video_frames=video is not None)


__all__ = ["LlavaOnevisionFactory", "OnevisionAdapter"]
