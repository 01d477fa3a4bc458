"""The embedded models and MODEL references. `policyc:default` is the small LLaVA trained on the synthetic
scenes (policyc.vqa): a `save_pretrained` directory (config, safetensors weights, tokenizer, processor) inside
the package, loaded with `from_pretrained` like any local model. `policyc:random` is a tiny LLaVA with random
weights built in a second (policyc.models.random_tiny), for tests of the compiler's mechanics. A MODEL
reference is one of those names, a directory or a hub id.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from policyc.errors import PolicyError

DEFAULT_NAME = "policyc:default"  # the trained model in the package's data/vqa directory
RANDOM_NAME = "policyc:random"  # the random tiny model of policyc.models.random_tiny
EXAMPLE_QUESTION = "what color is the triangle ?"  # `policyc run`'s default prompt; the answer is green


def bundled_model_dir() -> Path:
    """The directory the trained model was saved to (inside the installed package)."""
    return Path(str(resources.files("policyc.data").joinpath("vqa")))


def example_image_path() -> Path:
    """The example scene shipped in the package: test sample 0 of policyc.vqa.scenes (96x96 PNG)."""
    return Path(str(resources.files("policyc.data").joinpath("scene.png")))


def reference_name(name: str) -> str:
    """How a MODEL argument is recorded: `default` and `random` are the embedded models, a directory its
    absolute path, anything else a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return {"default": DEFAULT_NAME, "random": RANDOM_NAME}.get(name, name)


def _bundled_or_fail() -> str:
    directory = bundled_model_dir()
    if not (directory / "model.safetensors").is_file():
        raise PolicyError.at(f"the embedded model {DEFAULT_NAME} has no weights in {directory} (a partial install?)",
                             None, "reinstall policyc, or train one with `python scripts/train_vqa.py` and pass "
                             "DIR/model as MODEL")
    return str(directory)


def load_reference_model(reference: str, device: Any = "cpu", dtype: Any = None) -> Any:
    """The model `reference` names (see `reference_name`), in eval mode on `device`."""
    from policyc.models import load_model

    if reference == RANDOM_NAME:
        from policyc.models.random_tiny import random_model

        return random_model(device)
    local = reference == DEFAULT_NAME
    path = _bundled_or_fail() if local else reference
    return load_model(path, dtype=dtype, device=device, local_files_only=local)[0]


def load_reference_processor(reference: str) -> Any:
    """The processor (image processor, tokenizer, chat template) of `reference`; never downloaded for the
    embedded models."""
    if reference == RANDOM_NAME:
        from policyc.models.random_tiny import random_processor

        return random_processor()
    from transformers import AutoProcessor

    path = _bundled_or_fail() if reference == DEFAULT_NAME else str(Path(reference).expanduser())
    local = Path(path).exists()
    try:
        return AutoProcessor.from_pretrained(path if local else reference, local_files_only=local)
    except (OSError, ValueError, TypeError, ImportError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "torchvision" in str(error).lower():  # video processors (InternVL, Qwen2-VL, ...) and some image ones
            hint = f"its processor needs torchvision, which is not installed: pip install torchvision ({first})"
        elif isinstance(error, ImportError):
            hint = f"its processor needs a package that is not installed ({first})"
        else:
            hint = f"the model directory needs the files processor.save_pretrained() writes ({first})"
        raise PolicyError.at(f"cannot load a processor (image processor and tokenizer) for '{reference}'", None,
                             hint) from None


__all__ = ["DEFAULT_NAME", "EXAMPLE_QUESTION", "RANDOM_NAME", "bundled_model_dir", "example_image_path",
           "load_reference_model", "load_reference_processor", "reference_name"]
