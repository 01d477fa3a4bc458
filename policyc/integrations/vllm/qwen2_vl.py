"""vLLM's Qwen2-VL and Qwen2.5-VL serving a policyc policy before the LLM, with policyc's exact M-RoPE positions.

Registered in place of vLLM's `Qwen2VLForConditionalGeneration` and `Qwen2_5_VLForConditionalGeneration`
(`register()` in __init__.py); without a `policyc` entry in the config each is vLLM's own model, unchanged. With one:

- the processor gives each image the policy's kept count for its grid (`qwen_kept_count`: dynamic resolution, so
  the count follows each image's size), so prompts, the scheduler and the KV cache hold only the kept tokens;
- `get_mrope_input_positions`, which vLLM calls when it admits a request (before its encoder step, with each
  image's pixels at hand), runs the deployment's stages on each image to learn which tokens it keeps, and gives
  them their (t, h, w) coordinates in the unpruned grid; the text after an image starts where the unpruned layout
  starts it (`kept_mrope_positions`). These are the positions transformers gives the same tokens under policyc.
  The kept slots are remembered by the image's pixels, and the encoder step checks it keeps the same ones;
- `embed_multimodal` runs the transformers tower and merger (qwen_stages.py) with the policy compiled onto them and
  hands vLLM each image's kept embeddings in raster order.

Each image's stages thus run twice (at admission for its positions, at the encoder step for its embeddings): vLLM
0.32 fixes a request's positions before its encoder runs, and its only later hook (`recompute_mrope_positions`)
runs only with `--video-pruning-rate > 0`. Videos, image embeddings and per-request budgets are refused with a policy.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing.processor import PromptReplacement, PromptUpdate

from policyc.errors import PolicyError
from policyc.integrations.vllm.deployment import KEY, Deployment, deployment
from policyc.integrations.vllm.qwen_stages import (
    PROBE_GRID,
    QwenPreLLM,
    kept_mrope_positions,
    qwen_kept_count,
    qwen_shell,
)
from policyc.integrations.vllm.stages import RequestError

_REMEMBERED = 4096  # images whose kept slots the model remembers between admission and encoding


def _grid(config: Any, grid_thw: torch.Tensor) -> tuple[int, int]:
    """An image's patch grid (rows, cols) from its `image_grid_thw` [3]."""
    frames, rows, cols = (int(v) for v in grid_thw.tolist())
    if frames != 1:
        raise PolicyError.at(f"an image of {frames} frames reached policyc's Qwen2-VL", None)
    return rows, cols


class PolicycQwenProcessorMixin:
    """The Qwen processor with the policy's count of placeholders per image (by its grid)."""

    info: Any

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        if KEY in hf_kwargs:
            raise RequestError.at(f"mm_processor_kwargs {KEY} was given, but policyc serves no per-request budgets on "
                                  "Qwen2-VL in vLLM", None, f"drop mm_processor_kwargs' {KEY} entry")
        return super()._call_hf_processor(hf_data, hf_kwargs)  # type: ignore[misc]

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        config = self.info.get_hf_config()
        found = deployment(config)
        if found is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)  # type: ignore[misc]
        if mm_items.get_count("video", strict=False):
            raise RequestError.at("policyc's Qwen2-VL deployment serves images, and this request has a video", None,
                                  "send videos to a deployment without hf_overrides' policyc entry")

        def replacement(item_idx: int) -> list[int]:
            grid = _grid(config, out_mm_kwargs["image"][item_idx]["image_grid_thw"].data)
            return [config.image_token_id] * qwen_kept_count(config, found, grid)

        return [PromptReplacement(modality="image", target=[config.image_token_id], replacement=partial(replacement))]


class PolicycQwen2VLProcessor(PolicycQwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class PolicycQwen2_5_VLProcessor(PolicycQwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


def _digest(pixels: torch.Tensor, grid_thw: torch.Tensor) -> str:
    """A key for one image: its pixel rows' bytes and its grid."""
    data = pixels.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data + repr(grid_thw.tolist()).encode()).hexdigest()


class PolicycQwenMixin:
    """vLLM's Qwen2-VL / 2.5-VL whose images go through a deployment's pre-LLM stages, at policyc's positions."""

    config: Any
    visual: nn.Module

    def _policyc_init(self, vllm_config: VllmConfig) -> None:
        self.policyc_kept: list[list[int]] = []  # the last encoder call's kept slots per image (for tests)
        self._served: tuple[Deployment, nn.Module, nn.Module] | None = None  # the deployment, the shell and vLLM's
        # input normalization (pixels arrive unnormalized where vLLM normalizes them on the device); in a tuple, as
        # no submodules of this model
        self._stages: QwenPreLLM | None = None  # compiled at the first images, after the weights are loaded
        self._remembered: OrderedDict[str, list[int]] = OrderedDict()  # image digest -> kept slots at admission
        found = deployment(self.config)
        if found is None:
            return
        qwen_kept_count(self.config, found, PROBE_GRID)  # refused here too if vLLM's frontend did not check it
        multimodal = vllm_config.model_config.multimodal_config
        if multimodal is not None and multimodal.is_multimodal_pruning_enabled():
            raise PolicyError.at("vLLM's video pruning (--video-pruning-rate) rewrites the positions policyc sets",
                                 None, "serve the policy without --video-pruning-rate")
        if getattr(vllm_config.compilation_config, "cudagraph_mm_encoder", False):
            raise PolicyError.at("vLLM's encoder CUDA graphs bypass the policy's stages", None,
                                 "serve the policy without encoder CUDA graphs")
        normalize = self.visual.input_norm
        with self._mark_tower_model(vllm_config, {"image", "video"}):  # type: ignore[attr-defined]
            shell = qwen_shell(self.config)
            self.visual = shell.model.visual
        self._served = (found, shell, normalize)

    def _policy_stages(self) -> QwenPreLLM:
        assert self._served is not None  # only called with a deployment
        if self._stages is None:
            self._stages = QwenPreLLM(self._served[1], self._served[0])
        return self._stages

    def _kept(self, pixels: torch.Tensor, grids: torch.Tensor) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Per image (packed pixel rows [P, C * t * p * p], grids [I, 3]): its kept embeddings [K, D] and slots,
        failing where an image keeps another count than its placeholders hold."""
        assert self._served is not None
        tower = next(self.visual.parameters())
        stages = self._policy_stages()
        normalized = self._served[2](pixels.to(device=tower.device), tower.dtype).to(tower.dtype)
        embeddings, slots = stages(normalized, grids.to(tower.device))
        for index, (rows, grid) in enumerate(zip(embeddings, grids, strict=True)):
            count = qwen_kept_count(self.config, self._served[0], _grid(self.config, grid))
            if len(rows) != count:
                raise PolicyError.at(f"policy {stages.plan.name} kept {len(rows)} tokens of image {index}, not the "
                                     f"{count} its placeholders hold", None)
        return embeddings, [s.tolist() for s in slots]

    def embed_multimodal(self, **kwargs: object) -> Any:
        """Per image, its kept tokens' embeddings [K, D] (K: the deployment's count for its grid)."""
        if self._served is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        if any(kwargs.get(name) is not None for name in ("pixel_values_videos", "video_embeds", "image_embeds")):
            raise PolicyError.at("video or image embeddings reached a policyc deployment, which encodes image pixels",
                                 None, "send images (pixels) to a policyc deployment")
        pixels, grids = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
        if not isinstance(pixels, torch.Tensor) or not isinstance(grids, torch.Tensor):
            return []
        embeddings, slots = self._kept(pixels, grids)
        sizes = grids.prod(-1).tolist()
        for index, (image, grid) in enumerate(zip(pixels.split(sizes), grids, strict=True)):
            admitted = self._remembered.get(_digest(image, grid))
            if admitted is not None and admitted != slots[index]:  # its positions were set for those tokens
                raise PolicyError.at(f"image {index} kept other tokens when encoded than when its positions were set",
                                     None)
        self.policyc_kept = slots
        return tuple(embeddings)

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """M-RoPE positions [3, len(input_tokens)] and the delta after the prompt: each image's kept tokens at their
        unpruned coordinates, the text after it where the unpruned layout starts it."""
        if self._served is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
        merge = self.config.vision_config.spatial_merge_size
        images = []
        for feature in mm_features:
            if feature.modality != "image" or feature.data is None:
                raise PolicyError.at(f"a {feature.modality} without its pixels reached a policyc deployment", None)
            pixels, grid = feature.data["pixel_values"].data, feature.data["image_grid_thw"].data
            key = _digest(pixels, grid)
            if key not in self._remembered:
                self._remembered[key] = self._kept(pixels, grid[None])[1][0]
                while len(self._remembered) > _REMEMBERED:
                    self._remembered.popitem(last=False)
            kept = self._remembered[key]
            if len(kept) != feature.mm_position.length:
                raise PolicyError.at(f"an image keeps {len(kept)} tokens but has {feature.mm_position.length} "
                                     "placeholders", None)
            rows, cols = _grid(self.config, grid)
            images.append((feature.mm_position.offset, rows // merge, cols // merge, torch.tensor(kept)))
        return kept_mrope_positions(len(input_tokens), images)


@MULTIMODAL_REGISTRY.register_processor(PolicycQwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class PolicycQwen2VL(PolicycQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL whose image embeddings and positions follow a deployment's pre-LLM stages."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._policyc_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(PolicycQwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class PolicycQwen2_5_VL(PolicycQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL whose image embeddings and positions follow a deployment's pre-LLM stages."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._policyc_init(vllm_config)


def kept_slots(model: PolicycQwenMixin) -> list[list[int]]:
    """The slots (indices into the unpruned merged tokens) each image of the model's last encoder call kept; for
    `LLM.apply_model(kept_slots)` (which needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)."""
    return model.policyc_kept


__all__ = ["PolicycQwen2VL", "PolicycQwen2_5_VL", "kept_slots"]
