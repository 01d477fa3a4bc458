"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): LLaVA-NeXT's anyres images on a SigLIP tower and a
Qwen2 LLM, with several images per prompt and videos.

What differs from LLaVA-NeXT (llava_next.py, whose `build_anyres` this adapter shares):
- SigLIP: no CLS token (CLS signals fail with a substitute), every patch reaches the projector ("full").
- anyres_max_N: when an image's unpadded crop features exceed N base views, they are interpolated down
  before the newline features are added. A prompt with several images (`batch_num_images` > 1) encodes each
  with its base view only, plus one newline.
- videos: every frame's features are pooled 2x2 and the video ends with one newline feature, all on
  `<video>` placeholders (`video_token_id`).
- the `vision` set holds image and video placeholders: base views, crops, pooled frames and newlines.
- the LLM (Qwen2) uses 1-D RoPE and a causal mask, as LLaVA's.

Encoder merges run per encoder input (base view, crop, video frame) and are unmerged at the feature layer, as on
LLaVA-NeXT. Projector stages run per image on its packed tokens, newlines kept, as on LLaVA-NeXT (the anyres_max
interpolation included); a forward with videos fails while they are bound (`VIDEO`).
"""

from __future__ import annotations

from torch import nn

from policyc.models.base import AdapterFactory, ModelAdapter, register_adapter
from policyc.models.llava_next import build_anyres
from policyc.models.structure import config_int

VIDEO = ("projector stages do not run on LLaVA-OneVision videos yet: a video's frames are pooled 2x2 and scattered "
         "onto video placeholders after the images, which the stages' per-image tokens do not cover")


@register_adapter
class LlavaOnevisionFactory(AdapterFactory):
    """LLaVA-OneVision: encoder merges, projector stages per image, LLM stages and decode cache policies."""

    family = "llava_onevision"
    description = "LlavaOnevisionForConditionalGeneration (encoder merges, projector, LLM and decode stages)"
    model_types = frozenset({"llava_onevision"})

    def build(self, model: nn.Module) -> ModelAdapter:
        video = config_int(model.config, "video_token_id", "video_token_index")
        return build_anyres(model, self.family, video_token_id=video, video_unsupported=VIDEO)


__all__ = ["VIDEO", "LlavaOnevisionFactory"]
