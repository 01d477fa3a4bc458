"""Semantic checks of a resolved policy: names, types, stage rules, parameter domains, budgets.

Checks that need a model (a layer past the last one, a CLS token on SigLIP) cannot run here;
they are recorded as `Requirement`s, each with the span that caused it, for `policyc compile`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import cast

from policyc.catalog import CACHES, HOOKS, MERGES, POSITIONS, SELECTORS, SETS, SIGNALS, HookSpec
from policyc.errors import Diagnostic, PolicyError, Span, suggestion
from policyc.lang import ir
from policyc.lang.layers import DEPTH, layer_count, order_key, static_layers, uses_names
from policyc.lang.parser import keywords
from policyc.lang.printer import hook_text, print_expr
from policyc.lang.resolve import PlacedStage, Program, Scope
from policyc.lang.types import AMOUNT, Context, Definition, check_arguments, expect, param_type, param_words


@dataclass(frozen=True)
class Requirement:
    """Something the model must have, checked by `policyc compile` (e.g. `encoder_layer` 22)."""

    what: str  # "cls_token" | "encoder_layer" | "llm_layer"
    value: int | None
    span: Span | None
    reason: str


@dataclass(frozen=True)
class StagePlan:
    """A placed stage with what the checker learned about it."""

    placed: PlacedStage
    label: str  # `llm.layer[2, 6]` or `fastv: llm.layer[1]` for a used policy's stage
    hook: HookSpec
    layers: tuple[int, ...] | None  # static layer indices (None: `*` or unknown until compile)
    order: tuple


@dataclass(frozen=True)
class CheckedPolicy:
    program: Program
    stages: tuple[StagePlan, ...]
    requirements: tuple[Requirement, ...]
    sources: Mapping[str, str] = field(default_factory=dict, repr=False)  # file -> text, for later errors


class _Collector:
    """Gathers diagnostics so one run reports every independent problem."""

    def __init__(self) -> None:
        self.diagnostics: list[Diagnostic] = []

    def run(self, check, *args) -> object:  # type: ignore[no-untyped-def]
        try:
            return check(*args)
        except PolicyError as error:
            self.diagnostics.extend(error.diagnostics)
            return None

    def raise_if_any(self) -> None:
        if self.diagnostics:
            raise PolicyError(self.diagnostics)


def check_program(program: Program) -> CheckedPolicy:
    """Check every scope's declarations and every stage; raise one `PolicyError` listing all problems."""
    collect = _Collector()
    for scope in program.scopes:
        collect.run(_check_declarations, scope)
    collect.raise_if_any()
    plans = [p for p in (collect.run(_plan, placed) for placed in program.stages) if p is not None]
    collect.raise_if_any()
    plans.sort(key=lambda p: p.order)
    collect.run(_check_layout, plans)
    requirements: list[Requirement] = []
    definitions = _all_definitions(plans)
    visible: dict[int, dict[str, Definition]] = {id(s): {} for s in program.scopes}
    for plan in plans:
        scope_defs = visible[id(plan.placed.scope)]
        later = {n: d for n, d in definitions[id(plan.placed.scope)].items() if n not in scope_defs}
        collect.run(_check_stage, plan, scope_defs, later, requirements)
    collect.run(_check_budgets, plans)
    collect.raise_if_any()
    return CheckedPolicy(program, tuple(plans), tuple(requirements))


# ---------------------------------------------------------------- declarations


def _check_declarations(scope: Scope) -> None:
    policy = scope.policy
    _unique([(m.key, m.span) for m in policy.meta], "metadata field")
    _unique([(p.name, p.span) for p in policy.params], "parameter")
    _unique([(s.name, s.span) for s in policy.stages if s.name], "stage name")
    for param in policy.params:
        _check_param(param)
    for name, value in scope.overrides.items():
        _check_override(scope, name, value)


def _unique(items: list[tuple[str, Span | None]], what: str) -> None:
    seen: dict[str, Span | None] = {}
    for name, span in items:
        if name in seen:
            first = seen[name]
            where = f" (first at line {first.line})" if first else ""
            raise PolicyError.at(f"duplicate {what} '{name}'{where}", span)
        seen[name] = span


def _check_name(name: str, span: Span | None, what: str) -> None:
    """Names used in expressions must not be keywords: `let top = ...` could never be read back
    (`keep top ...` is a selection). Policy and stage names never appear in expressions."""
    if name in keywords():
        raise PolicyError.at(f"{what} name '{name}' is a keyword", span, "choose another name")
    if name in SELECTORS:  # every selector is a keyword of the selection rule (policyc.lang.parser.extra_selectors)
        raise PolicyError.at(f"{what} name '{name}' is a selector", span, "choose another name")
    if name == DEPTH:
        raise PolicyError.at(f"{what} name '{name}' is the model's layer count in layer selections", span,
                             "choose another name")


def _check_param(param: ir.Param) -> None:
    _check_name(param.name, param.span, "parameter")
    if param.name in SETS or param.name in SIGNALS:
        raise PolicyError.at(f"parameter name '{param.name}' is a built-in name", param.span,
                             "choose another name")
    default = param.default
    _check_percent(default)
    domain = param.domain
    if isinstance(domain, ir.RangeDomain):
        bounds = [domain.low, domain.high, *([domain.step] if domain.step else [])]
        for bound in bounds:
            _check_percent(bound)
            if type(bound) is not type(default) and isinstance(default, ir.Number | ir.Percent):
                kind = "percentages" if isinstance(default, ir.Percent) else "numbers"
                raise PolicyError.at(f"the range of '{param.name}' must hold {kind} like its default", bound.span)
        if not isinstance(default, ir.Number | ir.Percent):
            raise PolicyError.at(f"a range needs a numeric default, not {_literal(default)}", default.span,
                                 "write `in {a, b}` for a set of words or strings")
        if domain.low.value >= domain.high.value:
            raise PolicyError.at(f"empty range: {_literal(domain.low)} is not below {_literal(domain.high)}",
                                 domain.span)
        if not domain.low.value <= default.value <= domain.high.value:
            raise PolicyError.at(
                f"default {_literal(default)} of '{param.name}' is outside its range "
                f"[{_literal(domain.low)}, {_literal(domain.high)}]", default.span,
                "move the default inside the range or widen the range")
        if domain.step is not None and domain.step.value <= 0:
            raise PolicyError.at("a range step must be positive", domain.step.span)
        if domain.log and domain.low.value <= 0:
            raise PolicyError.at("a log range needs a positive lower bound", domain.low.span)
        if isinstance(default.value, int) and isinstance(default, ir.Number) and not all(
                isinstance(b.value, int) for b in bounds):
            raise PolicyError.at(f"'{param.name}' is a whole number but its range is not", domain.span,
                                 f"write the default as {default.value}.0 for a real-valued range")
    elif isinstance(domain, ir.ChoiceDomain):
        for option in domain.options:
            _check_percent(option)
        _unique([(_literal(o), o.span) for o in domain.options], "choice")
        if default not in domain.options:
            raise PolicyError.at(f"default {_literal(default)} of '{param.name}' is not one of its choices",
                                 default.span, "add it to the choices or pick one of them")
        kinds = {type(o) for o in domain.options} | {type(default)}
        if len(kinds) > 1 and not kinds <= {ir.Number}:
            raise PolicyError.at(f"the choices of '{param.name}' mix kinds of values", domain.span)


def _check_percent(value: ir.Node) -> None:
    if isinstance(value, ir.Percent) and not 0 <= value.value <= 100:
        raise PolicyError.at(f"percentage {_literal(value)} is outside 0%..100%", value.span)


def _literal(value: ir.Node) -> str:
    return print_expr(value)  # type: ignore[arg-type]


def _check_override(scope: Scope, name: str, value: ir.Expr) -> None:
    """`use p(name=value)`: the value must suit the parameter, evaluated in the using scope."""
    param = next(p for p in scope.policy.params if p.name == name)
    parent = scope.parent
    ctx = Context("llm", f"use {scope.policy.name}", (), {p.name: p for p in parent.policy.params} if parent else {},
                  {}, {})
    wanted = param_type(param)
    accepts = ("number", "count") if wanted in ("number", "count") else (wanted,)
    if wanted in ("enum", "set") and isinstance(value, ir.Name) and value.id not in ctx.params:
        if not any(isinstance(word, ir.Name) and word.id == value.id for word in param_words(param)):
            raise PolicyError.at(f"'{value.id}' is not a choice of parameter '{name}'", value.span)
        return
    expect(value, accepts, ctx, f"parameter '{name}' of '{scope.policy.name}'")


# ---------------------------------------------------------------- stages


def _plan(placed: PlacedStage) -> StagePlan:
    hook = placed.stage.hook
    point = hook.point
    if point not in HOOKS:
        raise PolicyError.at(f"unknown hook point '{point}'", hook.span,
                             suggestion(point, HOOKS.names(), "hook points"))
    spec = cast(HookSpec, HOOKS.specs[point])
    if spec.layered and hook.layers is None:
        raise PolicyError.at(f"'{point}' needs a layer selection", hook.span,
                             f"write {point.replace('layer', 'layer[2]', 1)}, a list like [2, 6] or [*] for all")
    if not spec.layered and hook.layers is not None:
        raise PolicyError.at(f"'{point}' takes no layer selection", hook.span)
    if hook.layers is not None and hook.layers_after != 2:
        raise PolicyError.at("the layer selection goes right after `layer`", hook.span,
                             f"write {point.replace('layer', 'layer[...]', 1)}")
    layers = static_layers(hook, placed.scope)
    label = hook_text(hook)
    if placed.scope.parent is not None:
        label = f"{placed.scope.label}: {label}"
    order = (spec.order, order_key(hook, placed.scope), 0 if point.endswith(".attention") else 1)
    return StagePlan(placed, label, spec, layers, order)


def _check_layout(plans: list[StagePlan]) -> None:
    seen: dict[tuple, StagePlan] = {}
    for plan in plans:
        point = plan.placed.stage.hook.point
        for layer in plan.layers or ((None,) if plan.layers is None and not plan.hook.layered else ()):
            key = (point, layer)
            if key in seen:
                raise PolicyError.at(f"two stages run at {point}{'' if layer is None else f'[{layer}]'}: "
                                     f"{seen[key].label} and {plan.label}", plan.placed.stage.span,
                                     "merge them into one stage, or move one to another layer")
            seen[key] = plan
    modes = {}
    for plan in plans:
        for statement in plan.placed.stage.body:
            if isinstance(statement, ir.Positions):
                modes.setdefault(statement.mode, (plan, statement))
    if len(modes) > 1:
        (mode_a, (plan_a, _)), (mode_b, (plan_b, statement)) = list(modes.items())[:2]
        raise PolicyError.at(f"positions differ between stages: {mode_a} at {plan_a.label}, {mode_b} at "
                             f"{plan_b.label}", statement.span, "use one position mode for the whole policy")


def _all_definitions(plans: list[StagePlan]) -> dict[int, dict[str, Definition]]:
    found: dict[int, dict[str, Definition]] = {}
    for plan in plans:
        scope_defs = found.setdefault(id(plan.placed.scope), {})
        for statement in plan.placed.stage.body:
            if isinstance(statement, ir.Let | ir.ScoreDef):
                kind = "set" if isinstance(statement, ir.Let) else "score"
                scope_defs.setdefault(statement.name, Definition(statement.name, kind, statement.span, plan.label,
                                                                 plan.order))
    return found


def _check_stage(plan: StagePlan, visible: dict[str, Definition], later: dict[str, Definition],
                 requirements: list[Requirement]) -> None:
    stage, scope = plan.placed.stage, plan.placed.scope
    kind = plan.hook.stage_kind
    params = {p.name: p for p in scope.policy.params}
    collect = _Collector()
    drops_before = False
    seen_modes: list[ir.Statement] = []
    # layers written with parameters or depth are checked when the policy is bound, with the values it runs with
    fixed = () if uses_names(stage.hook) else plan.layers or ()
    requirements.extend(layer_requirements(plan, fixed, tuple(k for k in fixed if k >= 0)))
    count = layer_count(stage.hook, scope)
    for statement in stage.body:
        ctx = Context(kind, plan.label, plan.order, params, visible, later, count, drops_before)
        collect.run(_check_statement, statement, ctx, seen_modes)
        if isinstance(statement, ir.Let | ir.ScoreDef) and statement.name not in visible:
            visible[statement.name] = Definition(statement.name, "set" if isinstance(statement, ir.Let) else "score",
                                                 statement.span, plan.label, plan.order)
        drops_before = drops_before or isinstance(statement, ir.Keep | ir.Drop | ir.Merge)
        requirements.extend(_requirements(statement, plan))
    collect.raise_if_any()


def _check_statement(statement: ir.Statement, ctx: Context, seen_modes: list[ir.Statement]) -> None:
    if ctx.kind == "decode" and not isinstance(statement, ir.Cache):
        raise PolicyError.at("the decode stage holds cache policies only", statement.span,
                             "write e.g. `cache heavy_hitter(heavy=10%, recent=10%)`")
    match statement:
        case ir.Let(name=name, value=value) | ir.ScoreDef(name=name, value=value):
            what = "set" if isinstance(statement, ir.Let) else "score"
            _check_name(name, statement.span, what)
            if name in SETS or name in SIGNALS or name in ctx.params:
                kind = "parameter" if name in ctx.params else "built-in name"
                raise PolicyError.at(f"'{name}' is already a {kind}", statement.span, "choose another name")
            if name in ctx.visible:
                first = ctx.visible[name]
                raise PolicyError.at(f"duplicate name '{name}' (first defined at {first.stage})", statement.span)
            expect(value, ("set",) if what == "set" else ("score",), ctx, f"the value of {what} '{name}'")
        case ir.Keep(target=target) | ir.Drop(target=target) | ir.Protect(target=target):
            expect(target, ("set",), ctx, f"what `{type(statement).__name__.lower()}` acts on")
        case ir.Merge():
            _check_merge(statement, ctx)
        case ir.Positions(mode=mode):
            if ctx.kind != "llm":
                raise PolicyError.at("positions only matter in llm.layer[...] stages", statement.span,
                                     "encoder and projector stages shorten the prompt before the LLM")
            POSITIONS.get(mode, statement.span)
            if seen_modes:
                raise PolicyError.at("a stage sets positions once", statement.span)
            seen_modes.append(statement)
        case ir.Cache():
            if ctx.kind != "decode":
                raise PolicyError.at("cache policies go in `stage decode { ... }`", statement.span)
            spec = CACHES.get(statement.method, statement.span)
            if seen_modes:
                raise PolicyError.at("the decode stage takes one cache policy", statement.span)
            seen_modes.append(statement)
            check_arguments(spec, (), statement.options, statement.span, ctx)


def _check_merge(merge: ir.Merge, ctx: Context) -> None:
    spec = MERGES.get(merge.method, merge.span)
    if ctx.kind not in spec.stages:
        raise PolicyError.at(f"merge '{merge.method}' is not available here", merge.span,
                             f"it works in {', '.join(sorted(spec.stages))} stages")
    check_arguments(spec, (), merge.options, merge.span, ctx)
    expect(merge.source, ("set",), ctx, "what `merge` folds")
    if spec.into and merge.into is None:
        raise PolicyError.at(f"merge '{merge.method}' needs `into <targets>`", merge.span,
                             f"e.g. merge {merge.method} of rest into targets by keys")
    if not spec.into and merge.into is not None:
        raise PolicyError.at(f"merge '{merge.method}' takes no `into`", merge.into.span)
    if merge.into is not None:
        expect(merge.into, ("set",), ctx, "the targets of `merge`")
    if spec.by is None and merge.by is not None:
        raise PolicyError.at(f"merge '{merge.method}' takes no `by`", merge.by.span)
    if spec.by is not None:
        if merge.by is None:
            example = "`by keys` or `by hidden`" if spec.by == "feature" else "`by attention(cls -> vision)`"
            raise PolicyError.at(f"merge '{merge.method}' needs `by <{spec.by}>`", merge.span, f"e.g. {example}")
        expect(merge.by, (spec.by,), ctx, f"what merge '{merge.method}' compares by")


# ---------------------------------------------------------------- budgets and requirements


def _kept_counts(plan: StagePlan) -> Iterator[tuple[int, int, Span | None]]:
    """(first, last) static kept counts of `keep <selector> N of vision` statements in a stage."""
    for statement in plan.placed.stage.body:
        if not (isinstance(statement, ir.Keep) and isinstance(statement.target, ir.Select)):
            continue
        select = statement.target
        if not (isinstance(select.source, ir.Name) and select.source.id == "vision"):
            continue
        amount = select.amount
        if isinstance(amount, ir.Number) and isinstance(amount.value, int):
            yield amount.value, amount.value, amount.span
        elif isinstance(amount, ir.ListExpr) and all(isinstance(i, ir.Number) for i in amount.items):
            values = [i.value for i in amount.items]  # type: ignore[union-attr]
            yield int(values[0]), int(values[-1]), amount.span


def _check_budgets(plans: list[StagePlan]) -> None:
    previous: tuple[int, str] | None = None
    for plan in plans:
        for first, last, span in _kept_counts(plan):
            if previous is not None and first > previous[0]:
                raise PolicyError.at(f"budget grows: {plan.label} keeps {first} image tokens after {previous[1]} "
                                     f"kept {previous[0]}", span, "later stages can only keep fewer tokens")
            previous = (last, plan.label)


def layer_requirements(plan: StagePlan, layers: tuple[int, ...], next_layers: tuple[int, ...] = ()
                       ) -> Iterator[Requirement]:
    """The layers a stage runs at (`layers`, as written) and those its `layer=next` signals read (the next of
    each of `next_layers`, which are counted from the start)."""
    what = "encoder_layer" if plan.hook.stage_kind == "encoder" else "llm_layer"
    yield from (Requirement(what, k, plan.placed.stage.hook.span, f"{plan.label} runs there") for k in layers)
    for node in (n for statement in plan.placed.stage.body for n in statement.walk()):
        if plan.hook.stage_kind == "llm" and isinstance(node, ir.Call) and node.fn in SIGNALS:
            layer = next((k.value for k in node.kwargs if k.name == "layer"), None)
            if isinstance(layer, ir.Name) and layer.id == "next":
                yield from (Requirement("llm_layer", k + 1, layer.span, f"{node.fn}(layer=next) recomputes it")
                            for k in next_layers)


def _requirements(statement: ir.Statement, plan: StagePlan) -> Iterator[Requirement]:
    for node in statement.walk():
        if isinstance(node, ir.Name) and node.id == "cls":
            yield Requirement("cls_token", None, node.span, "the policy reads the encoder's CLS token")
        if isinstance(node, ir.Call) and node.fn in SIGNALS:
            layer = next((k.value for k in node.kwargs if k.name == "layer"), None)
            target = "encoder_layer" if plan.hook.stage_kind in ("encoder", "projector") else "llm_layer"
            if isinstance(layer, ir.Number) and isinstance(layer.value, int):
                yield Requirement(target, layer.value, layer.span, f"{node.fn}() reads that layer")


__all__ = ["AMOUNT", "CheckedPolicy", "Requirement", "StagePlan", "check_program", "layer_requirements",
           "static_layers"]
