"""The operator API: what a built-in operator and a plug-in write, and how policyc finds them.

An operator is one class in one file: its language signature (`spec`: name, options with types, defaults,
bounds and choices, stages, paper, one-line summary) beside the one method that computes it. Registering it
makes the name usable in `.tokpol` with the checker's type checks and diagnostics, in search spaces, in
`policyc list` and in the docs.

    from policyc.operators import Option, SignalOp, Spec, register

    @register
    class ValueEnergy(SignalOp):
        spec = Spec("value_energy", "signal", "squared norm of each token's value vector", ...)

        def compute(self, call, ctx):  # [B, L] float over original positions
            ...

A package exposes its operators to every policyc user with an entry point in the `policyc.operators` group
naming a module (importing it registers its classes), an operator class, or a list of them:

    [project.entry-points."policyc.operators"]
    my_scorers = "my_package.operators"
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

from policyc.catalog.base import Option, Spec

ENTRY_POINT_GROUP = "policyc.operators"
_state = {"loaded": False}


def load() -> None:
    """Register the built-in operators, then every installed plug-in (once). A plug-in that fails to import or
    breaks the declaration rules raises a `PluginError` naming its package; the built-ins stay registered."""
    if _state["loaded"]:
        return
    _state["loaded"] = True  # set first: lookups while the modules import see the registries being filled
    import policyc.passes  # noqa: F401  (registers the built-ins)

    for entry in entry_points(group=ENTRY_POINT_GROUP):
        load_entry_point(entry)


def load_entry_point(entry: EntryPoint) -> None:
    """Import one `policyc.operators` entry point and register what it names, under its distribution's name."""
    from policyc.passes.base import LOADING_PACKAGE

    package = entry.dist.name if entry.dist is not None else entry.value.split(":")[0].split(".")[0]
    LOADING_PACKAGE.append(package)
    try:
        target = entry.load()
        if not isinstance(target, ModuleType):  # a class or a list of classes; a module registers on import
            for cls in target if isinstance(target, Iterable) else (target,):
                register(cls)
    except PluginError:
        raise
    except Exception as error:
        raise PluginError(f"policyc plug-in {package!r} (entry point {entry.name} = {entry.value}) failed to load: "
                          f"{type(error).__name__}: {error}") from error
    finally:
        LOADING_PACKAGE.pop()


def register(cls: type, package: str | None = None) -> type:
    """Register an operator class by its base (SignalOp, FeatureOp, SelectorOp, MergeOp, CacheOp); usable as
    a decorator. `package` names its owner in `policyc list` (default: the plug-in being loaded, else the
    class's top-level module)."""
    from policyc.passes import (
        CacheOp,
        FeatureOp,
        MergeOp,
        SelectorOp,
        SignalOp,
        register_cache,
        register_feature,
        register_merge,
        register_selector,
        register_signal,
    )
    from policyc.passes.base import LOADING_PACKAGE, DeclarationError

    registrars = ((SignalOp, register_signal), (FeatureOp, register_feature), (SelectorOp, register_selector),
                  (MergeOp, register_merge), (CacheOp, register_cache))
    chosen = next((r for base, r in registrars if isinstance(cls, type) and issubclass(cls, base)), None)
    owner = package or (LOADING_PACKAGE[-1] if len(LOADING_PACKAGE) > 1 else str(cls.__module__).split(".")[0])
    if chosen is None:
        raise PluginError(f"{owner}: {cls!r} is not an operator: subclass SignalOp, FeatureOp, SelectorOp, MergeOp "
                          "or CacheOp from policyc.operators")
    LOADING_PACKAGE.append(owner)
    try:
        return chosen(cls)
    except DeclarationError as error:
        raise PluginError(str(error)) from error
    finally:
        LOADING_PACKAGE.pop()


class PluginError(ValueError):
    """An operator or plug-in that cannot be registered; the message names its package."""


def __getattr__(name: str) -> object:  # the base classes, without importing torch for `Spec` and `Option`
    import policyc.passes as passes

    if name in {"SignalOp", "FeatureOp", "SelectorOp", "MergeOp", "CacheOp"}:
        return getattr(passes, name)
    raise AttributeError(name)


__all__ = ["ENTRY_POINT_GROUP", "CacheOp", "FeatureOp", "MergeOp", "Option", "PluginError", "SelectorOp",
           "SignalOp", "Spec", "load", "register"]
