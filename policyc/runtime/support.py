"""What the eager runtime implements today. Anything else fails at compile time, at its policy
line, instead of running with a silently different meaning."""

from __future__ import annotations

from policyc.catalog import SIGNALS
from policyc.compiler.plan import Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.passes import CACHE_OPS, SIGNAL_OPS

_REDUCTIONS = {"sum", "mean", "max", "min"}
_SETS = {"vision", "all", "text", "system", "last", "last_instruction"}


def check_supported(plan: Plan) -> None:
    problems: list[PolicyError] = []
    for stage in plan.stages:
        for statement in stage.statements:
            try:
                _statement(stage.kind, statement)
            except PolicyError as error:
                problems.append(error)
    if problems:
        raise PolicyError([d for p in problems for d in p.diagnostics])


def _not_yet(what: str, node: ir.Node) -> PolicyError:
    return PolicyError.at(f"{what} is not implemented by policyc's runtime yet", node.span,
                          "supported today: llm.layer[...] stages with let/score/keep/drop/protect, top selections, "
                          f"the signals {', '.join(sorted(SIGNAL_OPS))}, positions original or compact, "
                          f"and the cache policies full, {', '.join(sorted(CACHE_OPS))}")


def _statement(kind: str, statement: ir.Statement) -> None:
    if kind == "decode":
        if isinstance(statement, ir.Cache) and (statement.method == "full" or statement.method in CACHE_OPS):
            return
        raise _not_yet(f"cache policy '{getattr(statement, 'method', '?')}'", statement)
    if kind != "llm":
        raise _not_yet(f"a {kind} stage", statement)
    match statement:
        case ir.Positions(mode="original" | "compact"):
            return
        case ir.Positions(mode=mode):
            raise _not_yet(f"positions {mode}", statement)
        case ir.Merge():
            raise _not_yet("merge", statement)
        case ir.Let(value=value) | ir.ScoreDef(value=value) | ir.Keep(target=value) | ir.Drop(target=value) | \
                ir.Protect(target=value):
            _expr(value)


def _expr(expr: ir.Expr) -> None:
    match expr:
        case ir.Select(selector=selector) if selector != "top":
            raise _not_yet(f"the `{selector}` selector", expr)
        case ir.Select(amount=ir.ListExpr() | ir.Call() as amount):
            raise _not_yet("a schedule amount", amount)
        case ir.Call(fn=fn) if fn not in SIGNAL_OPS and fn not in _REDUCTIONS:
            raise _not_yet(f"{fn}()", expr)
        case ir.Call(fn=fn, kwargs=kwargs) if fn in SIGNAL_OPS:
            for kwarg in kwargs:
                if kwarg.name not in SIGNAL_OPS[fn].options:
                    raise _not_yet(f"{fn} option '{kwarg.name}'", kwarg)
                if kwarg.name == "layer" and not (isinstance(kwarg.value, ir.Name) and kwarg.value.id == "next"):
                    raise _not_yet(f"{fn}(layer=...) other than `next`", kwarg)
        case ir.Name(id=name) if name in SIGNALS and name not in SIGNAL_OPS:
            raise _not_yet(f"the signal '{name}'", expr)
        case ir.Name(id=name) if name in {"cls", "raters", "dropped"}:
            raise _not_yet(f"the token set '{name}'", expr)
        case ir.Index():
            raise _not_yet("per-image sets", expr)
    for child in expr.children():
        _expr(child)  # type: ignore[arg-type]
