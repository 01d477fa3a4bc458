"""vLLM's LLaVA (CLIP or SigLIP tower) serving a policyc policy before the LLM.

Registered in place of vLLM's `LlavaForConditionalGeneration` (`register()` in __init__.py); without a `policyc`
entry in the config it is vLLM's own class, unchanged. With one:

- the processor gives each image the policy's kept count of placeholders (`kept_count`, stages.py), so prompts,
  the scheduler and the KV cache hold only the kept tokens;
- the model runs the transformers tower and projector (shell.py) with the policy compiled onto them, and hands
  vLLM each image's kept embeddings in the order the LLM reads them. Positions are plain token indices: the kept
  tokens sit consecutively and the text after them moves up, as policyc's drop before the LLM does on transformers.

The tower and projector are transformers modules, replicated on every tensor-parallel rank; the LLM is vLLM's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import LlavaConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import BaseProcessingInfo, InputProcessingContext

from policyc.errors import PolicyError
from policyc.integrations.vllm.deployment import Deployment, deployment, llava_deployment
from policyc.integrations.vllm.shell import llava_shell
from policyc.integrations.vllm.stages import PreLLM, kept_count


class PolicycLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with the policy's placeholder count per image."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        config = self.get_hf_config()
        found = deployment(config)
        if found is None:
            return super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return kept_count(config, found)


def processing_info(ctx: InputProcessingContext) -> BaseProcessingInfo:
    """vLLM's LLaVA info, or policyc's where the config names a deployment."""
    if llava_deployment(ctx.get_hf_config(LlavaConfig)) is None:
        return _build_llava_or_pixtral_hf_info(ctx)
    return PolicycLlavaProcessingInfo(ctx)


@MULTIMODAL_REGISTRY.register_processor(_build_llava_or_pixtral_hf_processor, info=processing_info,
                                        dummy_inputs=LlavaDummyInputsBuilder)
class PolicycLlava(LlavaForConditionalGeneration):
    """vLLM's LLaVA whose image embeddings go through a deployment's pre-LLM stages."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.policyc_kept: list[list[int]] = []  # the last encoder call's kept slots per image (for tests)
        self._served: tuple[Deployment, nn.Module] | None = None  # a tuple: the shell is no submodule of this model
        self._stages: PreLLM | None = None  # compiled at the first images, after the weights are loaded by the
        # tower's own names (compiling wraps its layers)
        found = llava_deployment(self.config)
        if found is None:
            return
        self._count = kept_count(self.config, found)
        with self._mark_tower_model(vllm_config, "image"):
            shell = llava_shell(self.config)
            self.vision_tower = shell.model.vision_tower
            self.multi_modal_projector = shell.model.multi_modal_projector
        self._served = (found, shell)

    def embed_multimodal(self, **kwargs: object) -> Any:
        """Per image, its kept tokens' embeddings [K, D] (K: the deployment's count)."""
        if self._served is None:
            return super().embed_multimodal(**kwargs)
        if self._stages is None:
            self._stages = PreLLM(self._served[1], self._served[0])
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise PolicyError.at("image embeddings were given, but the deployment's policy runs on the vision tower",
                                 None, "send images (pixels) to a policyc deployment")
        pixel_values = image_input["pixel_values"]
        embeddings, kept = self._stages(pixel_values.to(next(self.vision_tower.parameters()).dtype))
        for index, rows in enumerate(embeddings):
            if len(rows) != self._count:  # vLLM sized the placeholders to the count: never serve another layout
                raise PolicyError.at(f"policy {self._stages.plan.name} kept {len(rows)} tokens of image {index}, "
                                     f"not the {self._count} its placeholders hold", None)
        self.policyc_kept = [k.tolist() for k in kept]
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
