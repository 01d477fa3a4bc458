"""policyc's pre-LLM stages inside vLLM, as an out-of-tree plugin (`pip install 'policyc[vllm]'`).

    vllm serve MODEL --hf-overrides '{"policyc": {"policy": "visionzip", "params": {"dominant": 54}}}'

vLLM calls `register()` in every process it starts (its `vllm.general_plugins` entry point): it puts policyc's
LLaVA (llava.py) and Qwen2-VL / Qwen2.5-VL (qwen2_vl.py) in place of vLLM's, which behave as vLLM's own unless the
config carries a `policyc` entry (deployment.py). What can be served and how many tokens each image keeps:
stages.py (qwen_stages.py per image grid). A `policyc` entry on a model the plugin does not serve is refused when
vLLM reads the config (guard.py). Importing this package imports neither vLLM nor torch; the core never imports it.
"""

from __future__ import annotations

ARCHITECTURES = {"LlavaForConditionalGeneration": "policyc.integrations.vllm.llava:PolicycLlava",
                 "Qwen2VLForConditionalGeneration": "policyc.integrations.vllm.qwen2_vl:PolicycQwen2VL",
                 "Qwen2_5_VLForConditionalGeneration": "policyc.integrations.vllm.qwen2_vl:PolicycQwen2_5_VL"}


def register() -> None:
    """Register policyc's model classes with vLLM (lazily: vLLM imports them where a model needs them). Idempotent,
    and touches no device."""
    from vllm import ModelRegistry

    from policyc.integrations.vllm.guard import guarded

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    ModelRegistry.inspect_model_cls = guarded(ModelRegistry.inspect_model_cls)  # type: ignore[method-assign]


__all__ = ["ARCHITECTURES", "register"]
