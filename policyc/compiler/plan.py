"""Lowering: a checked policy + a model adapter -> a `Plan` of stages bound to that model.

Binding resolves what the language left open: negative and `[*]` layer selections become the
model's layer indices, parameters take their values (defaults, `use` overrides, or a search's
assignments), and the requirements the checker recorded (layers, a CLS token) are checked
against the model, each failure pointing at the policy line that caused it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from policyc.catalog.base import StageKind
from policyc.errors import Diagnostic, PolicyError, Span, suggestion
from policyc.lang import ir
from policyc.lang.check import CheckedPolicy, StagePlan, layer_requirements
from policyc.lang.layers import bound_layers, uses_names
from policyc.lang.printer import print_expr, print_statement
from policyc.lang.resolve import Scope
from policyc.models.base import ModelAdapter
from policyc.models.structure import linear_layers


@dataclass(frozen=True)
class BoundStage:
    """One stage of the policy on one model: where it runs and with which parameter values."""

    label: str
    point: str  # hook point, e.g. "llm.layer"
    kind: StageKind
    layers: tuple[int, ...]  # absolute layer indices, in execution order; () for hooks without layers
    statements: tuple[ir.Statement, ...]
    values: Mapping[str, ir.Expr] = field(repr=False)  # parameter name (in the stage's scope) -> literal
    scope: Scope = field(repr=False)
    span: Span | None = field(default=None, repr=False)  # the stage's hook, for errors at run time

    def value(self, name: str) -> ir.Expr | None:
        return self.values.get(name)


@dataclass(frozen=True)
class Plan:
    """The policy bound to a model: stages in execution order."""

    checked: CheckedPolicy = field(repr=False)
    adapter: ModelAdapter = field(repr=False)
    stages: tuple[BoundStage, ...]

    @property
    def name(self) -> str:
        return self.checked.program.policy.name

    def at(self, point: str, layer: int | None = None) -> list[BoundStage]:
        """The stages that run at `point` (and `layer`, for layered hook points)."""
        return [s for s in self.stages if s.point == point and (layer is None or layer in s.layers)]

    def describe(self) -> str:
        """`policyc compile --emit plan`: the model, then each bound stage with its values."""
        lines = [f"policy {self.name} on {type(self.adapter.model).__name__}", *self.adapter.describe().split("\n"),
                 ""]
        for stage in self.stages:
            where = f"{stage.point}[{', '.join(map(str, stage.layers))}]" if stage.layers else stage.point
            lines.append(f"stage {stage.label} -> {where}  ({stage.kind})")
            for name, value in sorted(stage.values.items()):
                lines.append(f"  param {name} = {print_expr(value)}")
            lines.extend(f"  {print_statement(s)}" for s in stage.statements)
            linear = linear_layers(self.adapter.layer_types)
            if stage.kind == "decode" and linear:
                full = [k for k in range(len(self.adapter.decoder_layers)) if k not in linear]
                lines.append(f"  (cache policies act on the full-attention layers {', '.join(map(str, full))} only: "
                             "the linear-attention layers keep a fixed-size state, no KV cache)")
        return "\n".join(lines) + "\n"


def lower(checked: CheckedPolicy, adapter: ModelAdapter, assignments: Mapping[str, ir.Expr] | None = None) -> Plan:
    """Bind `checked` to `adapter`'s model. Raises `PolicyError` (at policy spans) for unmet requirements.

    `assignments` maps qualified parameter names (`ratio`, `fastv.ratio`) to literal values, as a
    search proposes them; a name that is no parameter of the policy is an error.
    """
    _check_assignments(checked, assignments or {})
    adapter.check(checked.requirements, [(p.label, p.hook.stage_kind, p.placed.stage.hook.span)
                                         for p in checked.stages])
    bound = [(plan, _bind(plan, adapter, assignments)) for plan in checked.stages]
    bound.sort(key=lambda pair: (pair[0].hook.order, pair[1].layers[:1], pair[0].order[-1]))
    _check_order(checked, [plan for plan, _ in bound])
    seen: dict[tuple[str, int], str] = {}
    for plan, stage in bound:
        for layer in stage.layers:
            key = (stage.point, layer)
            if key in seen:
                raise PolicyError.at(f"two stages run at {stage.point}[{layer}] on this model: {seen[key]} and "
                                     f"{stage.label}", plan.placed.stage.hook.span,
                                     "negative indices count from the end; pick distinct layers")
            seen[key] = stage.label
    _check_attention_layers([stage for _, stage in bound], adapter)
    return Plan(checked, adapter, tuple(stage for _, stage in bound))


def _check_attention_layers(stages: list[BoundStage], adapter: ModelAdapter) -> None:
    """On hybrid LLMs (Qwen3.5: Gated DeltaNet layers between full-attention ones) the signals that read a layer's
    attention, keys or values exist at its attention layers only: each one naming a linear layer is an error at its
    line, naming the nearest attention layers."""
    linear = set(linear_layers(adapter.layer_types))
    if not linear:
        return
    count = len(adapter.decoder_layers)
    full = [k for k in range(count) if k not in linear]
    problems = []
    for stage in (s for s in stages if s.kind == "llm"):
        for node in (n for statement in stage.statements for n in statement.walk()):
            name = node.fn if isinstance(node, ir.Call) else node.id if isinstance(node, ir.Name) else None
            if name not in _READS_ATTENTION or (isinstance(node, ir.Name) and name not in _FEATURES):
                continue
            option = next((k.value for k in node.kwargs if k.name == "layer"), None) \
                if isinstance(node, ir.Call) else None
            for read in _layers_read(option, stage.layers, count):
                if read in linear:
                    nearest = sorted(full, key=lambda k, read=read: abs(k - read))
                    closest = [k for k in nearest if abs(k - read) == abs(nearest[0] - read)]
                    problems.append(Diagnostic(
                        f"{name}() at {stage.label} reads LLM layer {read}, a linear-attention (Gated DeltaNet) layer "
                        f"of {type(adapter.decoder).__name__}: it has no attention weights, keys or values", node.span,
                        f"the nearest full-attention layer{'s' if len(closest) > 1 else ''}: "
                        f"{' or '.join(map(str, closest))} (this model attends at layers "
                        f"{', '.join(map(str, full))}); move the stage there, or read layer=K of one of them"))
                    break
    if problems:
        raise PolicyError(problems)


_READS_ATTENTION = frozenset({"attention", "key_norm", "value_norm", "keys", "values"})
_FEATURES = frozenset({"keys", "values"})  # written bare as a feature: `by keys`


def _layers_read(option: ir.Expr | None, layers: tuple[int, ...], count: int) -> list[int]:
    """The decoder layers a signal reads at a stage running at `layers`: its own, `layer=next`'s, or `layer=K`."""
    if isinstance(option, ir.Name) and option.id == "next":
        return [k + 1 for k in layers if k + 1 < count]
    if isinstance(option, ir.Number) and isinstance(option.value, int):
        return [option.value % count]
    return list(layers)


def _check_order(checked: CheckedPolicy, bound: list[StagePlan]) -> None:
    """The stages run in the order the checker saw them in (which layers written with `depth` or parameters
    could change on some models): sets and budgets were checked in that order."""
    for plan, expected in zip(bound, checked.stages, strict=True):
        if plan is not expected:
            raise PolicyError.at(f"on this model {plan.label} runs before {expected.label}, the other way round "
                                 f"from the order the policy was checked in", plan.placed.stage.hook.span,
                                 "write their layers so they keep one order on every model, e.g. both relative "
                                 "to depth")


def _check_assignments(checked: CheckedPolicy, assignments: Mapping[str, ir.Expr]) -> None:
    known = {scope.qualified(p.name): p for scope in checked.program.scopes for p in scope.policy.params
             if p.name not in scope.overrides}
    unknown = sorted(set(assignments) - set(known))
    if unknown:
        raise PolicyError.at(f"policy '{checked.program.policy.name}' has no searchable parameter "
                             f"'{unknown[0]}'", None, suggestion(unknown[0], sorted(known), "parameters"))
    for name, value in assignments.items():
        default = known[name].default
        whole = isinstance(default, ir.Number) and isinstance(default.value, int)
        if type(value) is not type(default) or (whole and not isinstance(value.value, int)):  # type: ignore[union-attr]
            raise PolicyError.at(f"parameter '{name}' holds values like {print_expr(default)}, not "
                                 f"{print_expr(value)}", known[name].span)
        if isinstance(value, ir.Percent) and not 0 <= value.value <= 100:  # as the checker refuses it in a policy
            raise PolicyError.at(f"parameter '{name}': percentage {print_expr(value)} is outside 0%..100%",
                                 known[name].span, f"give a share of the token set, e.g. {print_expr(default)}")


def _bind(plan: StagePlan, adapter: ModelAdapter, assignments: Mapping[str, ir.Expr] | None) -> BoundStage:
    stage, scope = plan.placed.stage, plan.placed.scope
    kind = plan.hook.stage_kind
    count = len(adapter.vision_layers) if kind == "encoder" else len(adapter.decoder_layers)
    layers: tuple[int, ...] = ()
    if plan.hook.layered:
        written = bound_layers(stage.hook, scope, assignments, count, plan.label)
        # layers written with names, and the next layers a stage reads, are only known now
        named = uses_names(stage.hook)
        adapter.check(layer_requirements(plan, (written or ()) if named else ()))
        indices = list(range(count)) if written is None else [k % count for k in written]
        if len(set(indices)) != len(indices):
            raise PolicyError.at(f"{plan.label} lists a layer twice on this {count}-layer model", stage.hook.span,
                                 "negative indices count from the end")
        layers = tuple(sorted(indices))
        unchecked = [k % count for k in written or () if named or k < 0] if written is not None else indices
        adapter.check(layer_requirements(plan, (), tuple(unchecked)))
        _check_schedules(plan, len(layers), count)
    values = {p.name: v for p in scope.policy.params if (v := scope.value(p.name, assignments)) is not None}
    return BoundStage(plan.label, stage.hook.point, kind, layers, stage.body, values, scope, stage.hook.span)


def _check_schedules(plan: StagePlan, layers: int, depth: int) -> None:
    """One budget per layer (`[300, 200, 110]`), counted on the model (`[*]`, `depth`, searched parameters)."""
    for node in (n for statement in plan.placed.stage.body for n in statement.walk()):
        if isinstance(node, ir.ListExpr) and len(node.items) != layers:
            raise PolicyError.at(f"{len(node.items)} budgets for {plan.label}, which runs at {layers} layers on "
                                 f"this {depth}-layer model", node.span, "give one budget per layer of the stage")
