"""The check that a `policyc` entry in a model's config is served exactly as written, or refused before vLLM starts.

vLLM sets any `hf_overrides` key on the model's config, whatever the model: without this check, `vllm serve
Qwen/Qwen2-VL-2B-Instruct --hf-overrides '{"policyc": ...}'` would serve the unmodified model. `register()` wraps
vLLM's `ModelRegistry.inspect_model_cls`, which every `ModelConfig` calls once its `hf_overrides` are applied (in the
frontend, before any engine process starts), with `check_deployment`: the entry must be a policy, the resolved
architecture one that policyc's plugin serves, and the policy servable on the model (its count measured).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from policyc.errors import PolicyError

FAMILIES = {"LlavaForConditionalGeneration": "LLaVA (a CLIP or SigLIP vision tower)",
            "Qwen2VLForConditionalGeneration": "Qwen2-VL", "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL"}


def check_deployment(config: Any, architecture: str) -> None:
    """Refuse a `policyc` entry on `config` (an HF config after vLLM's `hf_overrides`) that is not a policy, names
    a model family policyc does not serve in vLLM (`architecture`, as vLLM resolved it), or an unservable policy;
    a config without one passes."""
    from policyc.integrations.vllm.deployment import KEY, deployment, llava_deployment

    if getattr(config, KEY, None) is None:
        return
    deployment(config)  # the entry's own shape first: a malformed entry is refused on any model
    if architecture not in FAMILIES:
        family = getattr(config, "model_type", None) or "unknown"
        named = (getattr(config, "architectures", None) or [architecture])[0]
        runs = "" if named == architecture else f", which vLLM runs as {architecture}"
        raise PolicyError.at(
            f"policyc cannot serve this {family!r} model ({named}{runs}) in vLLM: its plugin serves "
            f"{', '.join(FAMILIES.values())}, and vLLM would serve this model without the policy", None,
            f"serve a {' or '.join(f.split(' (')[0] for f in FAMILIES.values())} model, or drop the {KEY!r} entry "
            "from hf_overrides to serve this one without a policy")
    if architecture != "LlavaForConditionalGeneration":  # Qwen2-VL / 2.5-VL: each image's count follows its grid
        from policyc.integrations.vllm.qwen_stages import PROBE_GRID, qwen_kept_count

        found = deployment(config)
        assert found is not None  # the entry is there
        qwen_kept_count(config, found, PROBE_GRID)
        return
    from policyc.integrations.vllm.stages import kept_count

    found = llava_deployment(config)
    assert found is not None  # the entry is there
    kept_count(config, found)


def guarded(inspect_model_cls: Callable[..., tuple[Any, str]]) -> Callable[..., tuple[Any, str]]:
    """`ModelRegistry.inspect_model_cls` that runs `check_deployment` on the architecture it resolves."""
    if getattr(inspect_model_cls, "policyc_guard", False):
        return inspect_model_cls

    @functools.wraps(inspect_model_cls)
    def inspect(architectures: str | list[str], model_config: Any) -> tuple[Any, str]:
        hf_config = getattr(model_config, "hf_config", None)
        named = [architectures] if isinstance(architectures, str) else list(architectures)
        if hf_config is not None and named and not set(named) & set(FAMILIES):
            check_deployment(hf_config, named[0])  # before vLLM inspects the model class (a subprocess)
        info, architecture = inspect_model_cls(architectures, model_config)
        if hf_config is not None:
            check_deployment(hf_config, architecture)  # e.g. a LLaVA that vLLM runs with its Transformers backend
        return info, architecture

    inspect.policyc_guard = True  # type: ignore[attr-defined]
    return inspect


__all__ = ["FAMILIES", "check_deployment", "guarded"]
