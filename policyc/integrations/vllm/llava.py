"""vLLM's LLaVA (CLIP or SigLIP tower) serving a policyc policy before the LLM.

Registered in place of vLLM's `LlavaForConditionalGeneration` (`register()` in __init__.py); without a `policyc`
entry in the config it is vLLM's own model, unchanged (its processor refuses a request's policyc parameters). With
one:

- the processor gives each image the policy's kept count of placeholders (`kept_count`, stages.py), so prompts,
  the scheduler and the KV cache hold only the kept tokens; a request may narrow it with its own parameter values
  (`mm_processor_kwargs={"policyc": {...}}`, `request_count`), which reach the model as a per-image field;
- the model runs the transformers tower and projector (shell.py) with the policy compiled onto them, and hands
  vLLM each image's kept embeddings in the order the LLM reads them. Positions are plain token indices: the kept
  tokens sit consecutively and the text after them moves up, as policyc's drop before the LLM does on transformers.

The tower and projector are transformers modules, replicated on every tensor-parallel rank; the LLM is vLLM's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers import BatchFeature, LlavaConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    BaseLlavaProcessingInfo,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import MultiModalDataItems
from vllm.multimodal.processing import BaseMultiModalProcessor, BaseProcessingInfo, InputProcessingContext
from vllm.multimodal.processing.dummy_inputs import BaseDummyInputsBuilder
from vllm.multimodal.processing.processor import PromptReplacement, PromptUpdate

from policyc.errors import PolicyError
from policyc.integrations.vllm.deployment import KEY, Deployment, deployment, llava_deployment
from policyc.integrations.vllm.shell import llava_shell
from policyc.integrations.vllm.stages import PreLLM, RequestError, kept_count, request_count

FIELD = "policyc_request"  # per image: its request's `mm_processor_kwargs` policyc entry, as JSON bytes [L] uint8


class PolicycLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with the policy's placeholder count per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        found = deployment(config)
        if found is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return kept_count(config, found)


def processing_info(ctx: InputProcessingContext) -> BaseProcessingInfo:
    """vLLM's LLaVA info (Pixtral-HF's for its towers), policyc's for every other LLaVA: it serves the deployment's
    count, or vLLM's without one."""
    info = _build_llava_or_pixtral_hf_info(ctx)
    llava_deployment(ctx.get_hf_config(LlavaConfig))  # a tower without a policyc path is refused here
    return PolicycLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _request_row(entry: object) -> torch.Tensor:
    return torch.tensor(list(json.dumps(entry, sort_keys=True).encode()), dtype=torch.uint8)


def _request_entry(row: torch.Tensor) -> object:
    return json.loads(bytes(row.tolist()).decode())


class PolicycLlavaProcessor(LlavaMultiModalProcessor):
    """LLaVA's processor with each request's budget: `mm_processor_kwargs={"policyc": {"tokens": 20}}` sets the
    policy's parameters for that request's images (`request_count`: at most the deployment's count). The entry
    reaches the model as a per-image field, and is part of vLLM's cache key for the image (its mm_hash)."""

    def _deployment_for(self, entry: object) -> tuple[Deployment, int] | None:
        config = self.info.get_hf_config()
        found = deployment(config)
        if found is None:
            if entry is not None:
                raise RequestError.at(f"mm_processor_kwargs {KEY} was given, but this deployment serves no policyc "
                                      "policy", None, f"start vLLM with hf_overrides' {KEY} entry, or drop it here")
            return None
        return request_count(config, found, entry)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        entry = hf_kwargs.get(KEY)
        processed = super()._call_hf_processor(hf_data, {k: v for k, v in hf_kwargs.items() if k != KEY})
        if self._deployment_for(entry) is not None and "pixel_values" in processed:
            processed[FIELD] = _request_row(entry).expand(len(processed["pixel_values"]), -1).clone()
        return processed

    def _get_mm_fields_config(self, hf_inputs: BatchFeature,
                              hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if FIELD in hf_inputs:
            fields[FIELD] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: MultiModalDataItems, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: MultiModalKwargsItems) -> Sequence[PromptUpdate]:
        served = self._deployment_for(hf_processor_mm_kwargs.get(KEY))
        if served is None:
            return super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        image_token_id = self.info.get_hf_config().image_token_index
        return [PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * served[1])]


def build_processor(info: BaseLlavaProcessingInfo, dummy_inputs: BaseDummyInputsBuilder) -> BaseMultiModalProcessor:
    if isinstance(info, PolicycLlavaProcessingInfo):
        return PolicycLlavaProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(build_processor, info=processing_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PolicycLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image embeddings go through a deployment's pre-LLM stages."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.policyc_kept: list[list[int]] = []  # the last encoder call's kept slots per image (for tests)
        self._served: tuple[Deployment, nn.Module] | None = None  # a tuple: the shell is no submodule of this model
        self._stages: PreLLM | None = None  # compiled at the first images, after the weights are loaded by the
        # tower's own names (compiling wraps its layers), and again for each request's parameters in turn
        found = llava_deployment(self.config)
        if found is None:
            return
        kept_count(self.config, found)  # refused here too if vLLM's frontend did not check it
        with self._mark_tower_model(vllm_config, "image"):
            shell = llava_shell(self.config)
            self.vision_tower = shell.model.vision_tower
            self.multi_modal_projector = shell.model.multi_modal_projector
        self._served = (found, shell)

    def _stages_for(self, served: Deployment) -> PreLLM:
        """The stages of `served` (the deployment, or a request's parameters of it) compiled onto the shell."""
        if self._stages is not None and self._stages.deployment.key == served.key:
            return self._stages
        if self._stages is not None:
            self._stages.compiled.remove()
            self._stages = None
        assert self._served is not None  # only called with a deployment
        self._stages = PreLLM(self._served[1], served)
        return self._stages

    def embed_multimodal(self, **kwargs: object) -> Any:
        """Per image, its kept tokens' embeddings [K, D] (K: the deployment's count, or its request's)."""
        if self._served is None:
            return super().embed_multimodal(**kwargs)
        rows = kwargs.pop(FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise PolicyError.at("image embeddings were given, but the deployment's policy runs on the vision tower",
                                 None, "send images (pixels) to a policyc deployment")
        pixel_values = image_input["pixel_values"].to(next(self.vision_tower.parameters()).dtype)
        entries = [None] * len(pixel_values) if rows is None else [_request_entry(row) for row in rows]  # type: ignore[union-attr]
        served = [request_count(self.config, self._served[0], entry) for entry in entries]
        embeddings: list[torch.Tensor] = [torch.empty(0)] * len(served)
        kept: list[list[int]] = [[]] * len(served)
        for key in dict.fromkeys(request.key for request, _ in served):  # the images of each request's parameters
            indices = [i for i, (request, _) in enumerate(served) if request.key == key]
            stages = self._stages_for(served[indices[0]][0])
            group, slots = stages(pixel_values[indices])
            for index, rows_kept, slots_kept in zip(indices, group, slots, strict=True):
                if len(rows_kept) != served[index][1]:  # vLLM sized the placeholders to the count: never another
                    raise PolicyError.at(f"policy {stages.plan.name} kept {len(rows_kept)} tokens of image {index}, "
                                         f"not the {served[index][1]} its placeholders hold", None)
                embeddings[index], kept[index] = rows_kept, slots_kept.tolist()
        self.policyc_kept = kept
        return tuple(embeddings)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The checkpoint's tower weights go under the tower's own names, with or without a `vision_model.` level
        as the checkpoint's transformers version wrote them (>= 5.24 writes none, vLLM's and transformers' older
        towers have one): vLLM's tower without a policy, the transformers tower with one; the rest as vLLM's
        LLaVA loads it."""
        nested = any(name.startswith("vision_model.") for name, _ in self.vision_tower.named_parameters())
        tower = re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?")
        mapper = self.hf_to_vllm_mapper | WeightsMapper(
            orig_to_new_regex={tower: "vision_tower.vision_model." if nested else "vision_tower."})
        return AutoWeightsLoader(self).load_weights(weights, mapper=mapper)


def kept_slots(model: PolicycLlava) -> list[list[int]]:
    """The slots (indices into the unpruned image tokens) each image of the model's last encoder call kept; for
    `LLM.apply_model(kept_slots)` (which needs VLLM_ALLOW_INSECURE_SERIALIZATION=1)."""
    return model.policyc_kept


__all__ = ["PolicycLlava", "PolicycLlavaProcessingInfo", "kept_slots", "processing_info"]
