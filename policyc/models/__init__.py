"""Model adapters: `adapt(model)` finds a model's hook points; `load_model` loads a model and adapts it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models import gemma3 as _gemma3  # noqa: F401  (registers the gemma3 factory)
from policyc.models import glm4v as _glm4v  # noqa: F401  (registers the glm4v factory)
from policyc.models import idefics3 as _idefics3  # noqa: F401  (registers the idefics3 factory)
from policyc.models import internvl as _internvl  # noqa: F401  (registers the internvl factory)
from policyc.models import llava as _llava  # noqa: F401  (registers the llava factory)
from policyc.models import llava_next as _llava_next  # noqa: F401  (registers the llava_next factory)
from policyc.models import llava_onevision as _llava_onevision  # noqa: F401  (registers llava_onevision)
from policyc.models import llava_onevision1_5 as _ov15  # noqa: F401  (registers llava_onevision1_5)
from policyc.models import mistral3 as _mistral3  # noqa: F401  (registers the mistral3 factory)
from policyc.models import qwen2_vl as _qwen2_vl  # noqa: F401  (registers the qwen2_vl factory)
from policyc.models import qwen3_5 as _qwen3_5  # noqa: F401  (registers the qwen3_5 factory)
from policyc.models import qwen3_vl as _qwen3_vl  # noqa: F401  (registers the qwen3_vl factory)
from policyc.models.base import (
    AdapterFactory,
    ModelAdapter,
    Requirement,
    factories,
    register_adapter,
    supported_families,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def adapt(model: nn.Module) -> ModelAdapter:
    """The adapter of the first registered family that matches `model`; `PolicyError` when none does."""
    for factory in factories():
        if factory.matches(model):
            return factory.build(model)
    vision = getattr(getattr(getattr(model, "config", None), "vision_config", None), "model_type", None)
    detail = f" with a {vision} vision tower" if vision else ""
    raise PolicyError.at(f"unsupported model {type(model).__name__}{detail}", None, hint=supported_families())


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or not _HUB_ID.match(name) or ".." in name


def _unavailable(name: str, local: bool, error: Exception) -> PolicyError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if local:
        message = f"cannot load model from '{name}': no such directory, and weights cannot be downloaded here"
        hint = "pass a directory written by save_pretrained() (it holds config.json and the weights)"
    else:
        message = (f"cannot load model '{name}': it is not in the local Hugging Face cache, "
                   "and weights cannot be downloaded here")
        hint = f"pass a local directory written by save_pretrained(), or fill the cache first ({first})"
    return PolicyError.at(message, None, hint)


def load_model(name_or_path: str, *, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
               local_files_only: bool = False) -> tuple[nn.Module, ModelAdapter]:
    """Load a hub id or a `save_pretrained` directory, in eval mode on `device`, with its adapter."""
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the CLI's output is the plan, not loading bars

    path = Path(name_or_path).expanduser()
    local = path.exists() or _looks_like_path(name_or_path)
    if local and not path.is_dir():
        raise _unavailable(name_or_path, True, FileNotFoundError(name_or_path))
    if local and not (path / "config.json").is_file():
        raise PolicyError.at(f"cannot load model from '{name_or_path}': the directory has no config.json", None,
                             "pass a directory written by save_pretrained() (it holds config.json and the weights)")
    source = str(path) if local else name_or_path
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only or local)
    except (OSError, ValueError) as error:
        if local:
            raise PolicyError.at(f"cannot read the model config in '{name_or_path}': {error}", None) from None
        raise _unavailable(name_or_path, False, error) from None

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        loader: Any = AutoModelForImageTextToText
    elif model_type == "llava":
        loader = LlavaForConditionalGeneration
    else:
        raise PolicyError.at(f"unsupported model type '{model_type}' in '{name_or_path}'", None,
                             hint=supported_families())
    kwargs: dict[str, Any] = {"local_files_only": local_files_only or local}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = loader.from_pretrained(source, config=config, **kwargs)
    except OSError as error:
        if local:
            raise PolicyError.at(f"cannot load the weights in '{name_or_path}': {error}", None,
                                 "the directory needs the weight files save_pretrained() writes") from None
        raise _unavailable(name_or_path, False, error) from None
    model = model.to(device).eval()
    return model, adapt(model)


__all__ = [
    "AdapterFactory",
    "ModelAdapter",
    "Requirement",
    "adapt",
    "factories",
    "load_model",
    "register_adapter",
    "supported_families",
]
