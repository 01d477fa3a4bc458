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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import EntryPoint, entry_points
from types import ModuleType

from policyc.catalog.base import Option, Registry, Spec

ENTRY_POINT_GROUP = "policyc.operators"
_state = {"loaded": False}


def load() -> None:
    """Register the built-in operators, then every installed plug-in (once). A plug-in that fails to import or
    breaks the declaration rules registers nothing; the others load, then a `PluginError` names each failed
    package (the built-ins and the other plug-ins stay registered)."""
    if _state["loaded"]:
        return
    _state["loaded"] = True  # set first: lookups while the modules import see the registries being filled
    import policyc.passes  # noqa: F401  (registers the built-ins)

    failures = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            load_entry_point(entry)
        except PluginError as error:
            failures.append(str(error))
    if failures:
        raise PluginError("\n".join(failures))


def load_entry_point(entry: EntryPoint) -> None:
    """Import one `policyc.operators` entry point and register what it names, under its distribution's name; all
    or nothing: when one of its operators fails, none of them stays registered."""
    from policyc.passes.base import LOADING_PACKAGE

    load()
    package = entry.dist.name if entry.dist is not None else entry.value.split(":")[0].split(".")[0]
    before = _snapshot()
    LOADING_PACKAGE.append(package)
    try:
        target = entry.load()
        if not isinstance(target, ModuleType):  # a class or a list of classes; a module registers on import
            for cls in target if isinstance(target, Iterable) else (target,):
                register(cls, package)
    except Exception as error:
        _restore(before)
        if isinstance(error, PluginError):
            raise
        raise PluginError(f"policyc plug-in {package!r} (entry point {entry.name} = {entry.value}) failed to load: "
                          f"{type(error).__name__}: {error}") from error
    finally:
        LOADING_PACKAGE.pop()


def register(cls: type, package: str | None = None) -> type:
    """Register an operator class by its base (SignalOp, FeatureOp, SelectorOp, MergeOp, CacheOp, a function or a
    schedule base); usable as
    a decorator. `package` names its owner in `policyc list` (default: the plug-in being loaded, else the
    class's top-level module). A declaration that breaks the rules raises `PluginError` and registers nothing."""
    from policyc.passes.base import LOADING_PACKAGE, DeclarationError

    load()
    owner = package or (LOADING_PACKAGE[-1] if len(LOADING_PACKAGE) > 1 else str(cls.__module__).split(".")[0])
    kind = _kind_of(cls)
    if kind is None:
        raise PluginError(f"{owner}: {cls!r} is not an operator: subclass SignalOp, FeatureOp, SelectorOp, MergeOp, "
                          "CacheOp, ScoreFunction, AmountFunction, SetFunction, ScheduleOp or LayerSchedule from "
                          "policyc.operators")
    LOADING_PACKAGE.append(owner)
    try:
        return kind[1](cls)
    except DeclarationError as error:
        raise PluginError(str(error)) from error
    finally:
        LOADING_PACKAGE.pop()


def unregister(*operators: type | str) -> None:
    """Remove operators (their classes, or their names) from the runtime and the catalog: a plug-in's, or one
    registered at run time (tests, notebooks). Built-in operators cannot be removed."""
    kinds = _kinds()
    for operator in operators:
        name = operator if isinstance(operator, str) else getattr(operator, "name", None)
        homes = [(ops, catalog) for _, _, ops, catalog in kinds if name in ops]
        if not homes:
            raise PluginError(f"no registered operator {operator!r} to unregister")
        for ops, catalog in homes:
            if catalog.packages.get(str(name)) == "policyc":
                raise PluginError(f"{name!r} is a built-in operator of policyc: it cannot be unregistered")
            del ops[str(name)]
            del catalog.entries[str(name)]
            del catalog.packages[str(name)]


@contextmanager
def registered(*classes: type, package: str | None = None) -> Iterator[tuple[type, ...]]:
    """Register `classes` for the duration of a `with` block, then remove them (all or nothing)."""
    before = _snapshot()
    try:
        done = tuple(register(cls, package) for cls in classes)
    except PluginError:
        _restore(before)
        raise
    try:
        yield done
    finally:
        unregister(*done)


def is_builtin(operator: object) -> bool:
    """Whether an operator (its class or its instance) is one of policyc's own (from policyc.passes)."""
    cls = operator if isinstance(operator, type) else type(operator)
    return cls.__module__.startswith("policyc.passes.")


def _kinds() -> tuple[tuple[type, Callable[[type], type], dict, Registry], ...]:
    """(base class, registrar, runtime registry, catalog registry) of each kind of operator."""
    from policyc import passes
    from policyc.catalog import CACHES, FUNCTIONS, MERGES, SCHEDULES, SELECTORS, SIGNALS

    return ((passes.SignalOp, passes.register_signal, passes.SIGNAL_OPS, SIGNALS),
            (passes.FunctionOp, passes.register_function, passes.FUNCTION_OPS, FUNCTIONS),
            (passes.ScheduleOp, passes.register_schedule, passes.SCHEDULE_OPS, SCHEDULES),
            (passes.FeatureOp, passes.register_feature, passes.FEATURE_OPS, SIGNALS),
            (passes.SelectorOp, passes.register_selector, passes.SELECTOR_OPS, SELECTORS),
            (passes.MergeOp, passes.register_merge, passes.MERGE_OPS, MERGES),
            (passes.CacheOp, passes.register_cache, passes.CACHE_OPS, CACHES))


def _kind_of(cls: object) -> tuple[type, Callable[[type], type], dict, Registry] | None:
    return next((k for k in _kinds() if isinstance(cls, type) and issubclass(cls, k[0])), None)


def _snapshot() -> list[tuple[dict, dict]]:
    """Copies of every operator registry, runtime and catalog, for `_restore`."""
    tables = [t for _, _, ops, catalog in _kinds() for t in (ops, catalog.entries, catalog.packages)]
    return [(table, dict(table)) for table in tables]


def _restore(snapshot: list[tuple[dict, dict]]) -> None:
    for table, saved in snapshot:
        table.clear()
        table.update(saved)


class PluginError(ValueError):
    """An operator or plug-in that cannot be registered; the message names its package."""


def __getattr__(name: str) -> object:  # the base classes and helpers, without importing torch for `Spec`, `Option`
    import policyc.passes as passes
    from policyc.passes import base

    if name in {"SignalOp", "FeatureOp", "SelectorOp", "MergeOp", "CacheOp", "ScoreFunction", "AmountFunction",
                "SetFunction", "ScheduleOp", "LayerSchedule"}:
        return getattr(passes, name)
    if name in {"number_value", "option_value", "scatter_scores"}:  # option values; [B, L'] rows -> [B, L] scores
        return getattr(base, name)
    raise AttributeError(name)


__all__ = ["ENTRY_POINT_GROUP", "AmountFunction", "CacheOp", "FeatureOp", "LayerSchedule", "MergeOp", "Option",
           "PluginError", "ScheduleOp", "ScoreFunction", "SelectorOp", "SetFunction", "SignalOp", "Spec", "is_builtin",
           "load", "load_entry_point", "number_value", "option_value", "register", "registered", "scatter_scores",
           "unregister"]
