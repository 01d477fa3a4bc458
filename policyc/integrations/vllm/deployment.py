"""A deployment's policy, as vLLM carries it: `hf_overrides={"policyc": {"policy": ..., "params": {...}}}`.

vLLM sets an unknown `hf_overrides` key on the model's config (`hf_config.policyc`, a dict) and pickles that config
into every engine process, so the frontend's processor and each worker read the same entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from policyc.errors import PolicyError, suggestion
from policyc.lang import ir

KEY = "policyc"  # the hf_overrides key
FIELDS = ("policy", "params")
EXAMPLE = '{"policyc": {"policy": "visionzip", "params": {"dominant": 54}}}'


@dataclass(frozen=True)
class Deployment:
    """The policy (a standard-library name or a `.tokpol` path) and its parameter values."""

    policy: str
    params: tuple[tuple[str, ir.Expr], ...] = ()

    @property
    def assignments(self) -> dict[str, ir.Expr]:
        return dict(self.params)

    @property
    def key(self) -> str:
        """A stable text for caches: the policy and its values as written."""
        return json.dumps([self.policy, [(name, repr(value)) for name, value in self.params]])


def _value(name: str, value: object, where: str = f"hf_overrides {KEY}.params") -> ir.Expr:
    from policyc.lang.build import parse_value

    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PolicyError.at(f"{where}.{name} is {value!r}", None,
                             "write a number (64, 0.5), a percentage (\"25%\") or a word")
    return parse_value(str(value), f"{where}.{name}")


def narrowed(found: Deployment, entry: object) -> Deployment:
    """The deployment with a request's parameter values (`mm_processor_kwargs={"policyc": {"tokens": 20}}`) in
    place of its own; `entry` None: the deployment itself."""
    if entry is None:
        return found
    if not isinstance(entry, dict) or not entry:
        raise PolicyError.at(f"mm_processor_kwargs {KEY} is {entry!r}, not the policy's parameters", None,
                             f'write e.g. {{"{KEY}": {{"tokens": 20}}}}')
    request = {str(name): _value(str(name), value, f"mm_processor_kwargs {KEY}") for name, value in entry.items()}
    params = dict(found.params) | request
    return Deployment(found.policy, tuple(sorted(params.items())))


def llava_deployment(config: Any) -> Deployment | None:
    """The deployment in a LLaVA config, refused where the tower has no policyc path; None without one."""
    from policyc.models.llava import VISION_TOWERS

    found = deployment(config)
    tower = getattr(config.vision_config, "model_type", None)
    if found is not None and tower not in VISION_TOWERS:
        raise PolicyError.at(f"policyc serves LLaVA with a CLIP or SigLIP tower in vLLM, not a {tower!r} tower", None,
                             "serve this model without hf_overrides' policyc entry, or a LLaVA with a CLIP or "
                             "SigLIP tower")
    return found


def deployment(config: Any) -> Deployment | None:
    """The deployment read from `config.policyc` (an HF config after vLLM's `hf_overrides`); None without one."""
    entry = getattr(config, KEY, None)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise PolicyError.at(f"hf_overrides {KEY} is {entry!r}, not a policy", None, f"write e.g. {EXAMPLE}")
    for field in entry:
        if field not in FIELDS:
            raise PolicyError.at(f"hf_overrides {KEY} has an unknown field {field!r}", None,
                                 suggestion(str(field), FIELDS, "fields"))
    policy, params = entry.get("policy"), entry.get("params", {})
    if not isinstance(policy, str) or not policy:
        raise PolicyError.at(f"hf_overrides {KEY} names no policy", None, f"write e.g. {EXAMPLE}")
    if not isinstance(params, dict):
        raise PolicyError.at(f"hf_overrides {KEY}.params is {params!r}, not a mapping of names to values", None,
                             f"write e.g. {EXAMPLE}")
    return Deployment(policy, tuple((str(name), _value(str(name), value)) for name, value in sorted(params.items())))


__all__ = ["EXAMPLE", "KEY", "Deployment", "deployment", "llava_deployment", "narrowed"]
