"""Compiling policies onto models: the eager backend (module-level) and the graph backends (inductor, fx)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from policyc.compiler.plan import lower
from policyc.errors import PolicyError
from policyc.lang import CheckedPolicy, Loader, check_path, check_stdlib, ir
from policyc.models import adapt
from policyc.runtime.compiled import BACKENDS, Backend, CompiledModel


def compile_model(model: nn.Module, policy: CheckedPolicy | str | Path,
                  assignments: Mapping[str, ir.Expr] | None = None, backend: Backend = "eager") -> CompiledModel:
    """Rewrite `model` in place to run `policy` (a checked policy, a `.tokpol` path holding one policy,
    or a standard-library name). Returns the compiled model; `.remove()` undoes the rewrite.

    `backend="eager"` is the reference semantics (layer wrappers, transformers' extension points);
    `backend="inductor"` captures the LLM with torch.compile (dynamo + aot_autograd), rewrites its prefill
    graph with the graph passes (passes/graph_*.py) and compiles the result with inductor; the first
    prompt of each shape pays the compile time. `backend="fx"` runs the rewritten graphs without
    inductor (to tell a pass from inductor)."""
    if backend not in BACKENDS:
        raise PolicyError.at(f"unknown backend '{backend}'", None, f"backends: {', '.join(BACKENDS)}")
    loader = Loader()
    sources = loader.sources
    try:
        checked = _checked(policy, loader)
        sources = {**checked.sources, **loader.sources}
        return CompiledModel(lower(checked, adapt(model), assignments), backend)
    except PolicyError as error:
        raise error.with_sources(sources) from None


def _checked(policy: CheckedPolicy | str | Path, loader: Loader) -> CheckedPolicy:
    if isinstance(policy, CheckedPolicy):
        return policy
    if Path(policy).is_file():
        found = check_path(policy, loader)
        if len(found) != 1:
            raise PolicyError.at(f"{policy} holds {len(found)} policies; pass one checked policy", None)
        return found[0]
    stdlib = check_stdlib(loader)
    if str(policy) not in stdlib:
        from policyc.errors import suggestion

        raise PolicyError.at(f"no file or standard-library policy named '{policy}'", None,
                             suggestion(str(policy), sorted(stdlib), "policies"))
    return stdlib[str(policy)]


__all__ = ["CompiledModel", "compile_model"]
