"""Mistral 3 (`Mistral3ForConditionalGeneration`: Mistral Small 3.1/3.2, Ministral 3) with its Pixtral tower.

What differs from LLaVA:
- the Pixtral tower (`PixtralVisionModel`) crops each image of `pixel_values` [I, 3, Hmax, Wmax] to its own size
  (`image_sizes` [I, 2], pixels), cuts it into patches and packs every image into one sequence [1, sum P_i, C]
  (a block-diagonal mask keeps images apart, 2-D rotary, no CLS token);
- the projector (`Mistral3MultiModalProjector`) is RMSNorm, then a per-image patch merger (each 2x2 block of
  patches, `unfold`, -> Linear 4C -> C), then Linear-GELU-Linear: an image of (h, w) patches gives (h/2)(w/2) LLM
  tokens in raster order, so token counts vary with the image's size;
- the Pixtral processor writes an image as rows of `[IMG]` x (w/2), each followed by `[IMG_BREAK]`, the last break
  replaced by `[IMG_END]`. The `vision` set holds the `[IMG]` tokens only (they alone receive features);
  `[IMG_BREAK]`/`[IMG_END]` are text tokens that stay (they tell the LLM where a row ends). An image is therefore
  not one run of `[IMG]` but the runs up to the one `[IMG_END]` closes (`image_index`). The config names only the
  `[IMG]` id, so `[IMG_END]` is read from the prompt: the token after the last `[IMG]` of a row (the processor
  always closes the last image there; a row's runs closed by that id end its images);
- the LLM (Mistral or Ministral 3) uses 1-D RoPE and a causal mask, as LLaVA's: LLM stages and decode cache
  policies bind as there (Ministral 3's attention scale also reads `position_ids`, which the runtime renumbers
  with the rotary).

Projector stages (`projector.output`) run per image on its LLM tokens, the projector's output split by image; the
LLM then drops the `[IMG]` tokens not kept at its input (the breaks stay). Images have their own sizes, so operators
that need one token grid (`grid`, `pool`, ...) and the question (MMTok) fail at compile time. There is no CLS token:
CLS signals (VisionZip's, FasterVLM's) fail at compile time naming a substitute (`visiondrop_llm`, VisionZip's
selection inside the LLM). Encoder stages fail at compile time for now: ToMe in the packed tower runs per image and
is unmerged before the patch merger (policyc/runtime/pixtral_tower.py, tested against tests/reference/tome_pixtral.py),
but ImageStages does not choose that runtime yet.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from policyc.models.base import (
    AdapterFactory,
    ImageTokensHook,
    ModelAdapter,
    example_pixels,
    placement,
    register_adapter,
    text_around,
)
from policyc.models.layout import ImageLayout, images_before, layout_error, numbered, one_view
from policyc.models.structure import adapt_error, config_int, image_token, language_model, vision_encoder

SAMPLE_TOKENS = (4, 6)  # LLM tokens (rows, columns) of the calibration image


@dataclass(frozen=True, eq=False)
class Mistral3Adapter(ModelAdapter):
    """A Mistral 3 adapter: images grouped from their first `[IMG]` to `[IMG_END]`, per-image projector stages."""

    patch_size: int = 14  # pixels per patch side
    merge_size: int = 2  # patches per LLM token side (the patch merger's unfold)

    @property
    def pixels_per_token(self) -> int:
        return self.patch_size * self.merge_size

    @property
    def packed_encoder(self) -> type:
        """The runtime of encoder stages in the packed Pixtral tower (ToMe per image, unmerged before the patch
        merger): policyc/runtime/pixtral_tower.py."""
        from policyc.runtime.pixtral_tower import PixtralEncoder  # (the runtime package imports the adapters)

        return PixtralEncoder

    def token_grids(self, image_sizes: torch.Tensor) -> list[tuple[int, int]]:
        """Each image's LLM token grid (rows, columns) from `image_sizes` [I, 2] (pixels)."""
        step = self.pixels_per_token
        return [(int(h) // step, int(w) // step) for h, w in image_sizes.tolist()]

    def image_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] long: which image of its prompt each `[IMG]` token belongs to, -1 elsewhere. A run of `[IMG]` (one
        row of an image) followed by the row's `[IMG_END]` id (the token after its last run) ends an image."""
        image = input_ids == self.image_token_id
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).expand_as(input_ids)
        after = nn.functional.pad(input_ids[:, 1:], (0, 1), value=-1)
        run_end = image & ~nn.functional.pad(image[:, 1:], (0, 1), value=False)
        last = torch.where(run_end, positions, -1).max(1).values
        end_id = input_ids.gather(1, (last + 1).clamp(max=length - 1)[:, None])
        closes = run_end & ((after == end_id) | (positions == length - 1))
        return torch.where(image, closes.long().cumsum(1) - closes.long(), -1)

    def hook_image_tokens(self, on_tokens: ImageTokensHook) -> Callable[[], None] | None:
        """A forward hook on the projector: its output [sum T_i, D] split by image (T_i from `image_sizes`, its second
        argument) goes through `on_tokens` (every token an image feature) and is packed back."""

        def on_output(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor) -> torch.Tensor:
            sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
            if not isinstance(sizes, torch.Tensor):
                sizes = torch.as_tensor(sizes)
            counts = [rows * columns for rows, columns in self.token_grids(sizes)]
            tokens = list(output.reshape(-1, output.shape[-1]).split(counts))
            flags = [torch.ones(len(t), dtype=torch.bool, device=output.device) for t in tokens]
            return torch.cat(on_tokens(tokens, flags, self.image_token_id)).reshape(output.shape)

        handle = self.projector.register_forward_hook(on_output, with_kwargs=True)
        return handle.remove

    def image_layouts(self, inputs: Mapping[str, torch.Tensor], row: int = 0) -> list[ImageLayout]:
        """Every image of row `row`: its pixels cropped to its size ([3, H, W], `pixel_values` holds every row's
        images in order) on its (H / 28) x (W / 28) grid of LLM tokens (raster order, as the merger leaves them)."""
        input_ids, sizes = inputs["input_ids"], inputs["image_sizes"].cpu()
        first = images_before(self, input_ids, row)
        counts = self.image_sizes(input_ids[row])
        if sizes.shape[0] < first + len(counts):
            raise layout_error(f"the prompt has {first + len(counts)} images up to row {row} but image_sizes only "
                               f"{sizes.shape[0]}")
        index = self.image_index(input_ids[row][None])[0]
        starts = index[self.visual_mask(input_ids[row])]
        layouts = []
        for k, count in enumerate(counts):
            (rows, columns), (height, width) = self.token_grids(sizes[first + k][None])[0], sizes[first + k].tolist()
            if rows * columns != count:
                raise layout_error(f"image {k + 1}'s {count} tokens do not tile its {rows}x{columns} grid")
            picture = inputs["pixel_values"][first + k][:, :height, :width]
            start = int((starts == k).nonzero()[0])
            layouts.append(one_view(numbered(k, len(counts)), picture, (rows, columns), start))
        return layouts

    def sample_inputs(self, text_tokens: int = 16) -> dict[str, torch.Tensor]:
        """`text_tokens` text ids around the example image at `SAMPLE_TOKENS` LLM tokens, written as the Pixtral
        processor writes it. The config names only `[IMG]`, so two ordinary text ids stand in for `[IMG_BREAK]` and
        `[IMG_END]` (they count as text, as those do)."""
        rows, columns = SAMPLE_TOKENS
        ordinary = text_around(self, text_tokens + 2, [])
        text, (breaks, end) = ordinary[:text_tokens], ordinary[text_tokens:]
        image = ([self.image_token_id] * columns + [breaks]) * rows
        image[-1] = end
        ids = text[:text_tokens // 2] + image + text[text_tokens // 2:]
        height, width = rows * self.pixels_per_token, columns * self.pixels_per_token
        device, dtype = placement(self.model)
        input_ids = torch.tensor([ids], device=device)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "pixel_values": example_pixels((height, width))[None].to(device=device, dtype=dtype),
                "image_sizes": torch.tensor([[height, width]], device=device)}


@register_adapter
class Mistral3Factory(AdapterFactory):
    """Mistral 3 with a Pixtral tower: projector stages per image, LLM stages and decode cache policies."""

    family = "mistral3"
    description = "Mistral3ForConditionalGeneration with a Pixtral tower (projector, LLM and decode stages)"
    model_types = frozenset({"mistral3"})

    def build(self, model: nn.Module) -> ModelAdapter:
        config = model.config
        vision_config = config.vision_config
        if getattr(vision_config, "model_type", None) != "pixtral":
            raise adapt_error(model, self.family, f"a {vision_config.model_type} vision tower (Pixtral expected)")
        encoder = vision_encoder(model, self.family)
        projectors = [m for m in model.modules() if type(m).__name__.endswith("MultiModalProjector")]
        if len(projectors) != 1:
            raise adapt_error(model, self.family, "no single multimodal projector found")
        patch = config_int(vision_config, "patch_size")
        merge = config_int(config, "spatial_merge_size") or 2
        if patch is None:
            raise adapt_error(model, self.family, "the vision config has no integer patch_size")
        layers = len(encoder["vision_layers"])
        feature_layer = config.vision_feature_layer
        return Mistral3Adapter(
            family=self.family,
            model=model,
            has_cls=False,
            feature_layer=(feature_layer if isinstance(feature_layer, int) else feature_layer[-1]) % (layers + 1),
            feature_start=0,
            keeps_cls_in_features=False,
            patch_grid=None,
            projector=projectors[0],
            image_token_id=image_token(model, self.family),
            tokens_per_image=None,
            encoder_patches_per_token=merge * merge,
            encoder_unmerges=True,  # the patch merger reads every patch: encoder merges are undone before it
            patch_size=patch,
            merge_size=merge,
            **encoder,
            **language_model(model, self.family),
        )


__all__ = ["Mistral3Adapter", "Mistral3Factory"]
