"""Type inference for expressions: every expression is a number, count, percent, schedule, score,
feature, condition, set, flow, enum word or text (see `policyc.catalog.base.ValueType`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from policyc.catalog import FUNCTIONS, SCHEDULES, SELECTORS, SETS, SIGNALS, Option, Spec
from policyc.catalog.base import StageKind, ValueType
from policyc.errors import PolicyError, Span, closest, suggestion
from policyc.lang import ir
from policyc.lang.layers import DEPTH

_STAGE_WORDS = {"encoder": "an encoder stage", "projector": "a projector stage", "llm": "an LLM stage",
                "decode": "the decode stage"}
_NUMERIC = {"number", "count", "score"}
AMOUNT: tuple[ValueType, ...] = ("count", "percent", "schedule")


@dataclass(frozen=True)
class Definition:
    """A `let` or `score` name: its type, where it is defined and when its stage runs."""

    name: str
    type: ValueType
    span: Span | None
    stage: str
    order: tuple


@dataclass
class Context:
    """What an expression in one statement of one stage can see."""

    kind: StageKind
    stage: str
    order: tuple
    params: dict[str, ir.Param]
    visible: dict[str, Definition]
    later: dict[str, Definition]
    layers: int | None = None  # layers in this stage's selection, when known statically
    drops_before: bool = False  # an earlier statement of this stage drops or merges tokens
    uses: list[tuple[str, Span | None]] = field(default_factory=list)  # names this statement reads


def param_type(param: ir.Param) -> ValueType:
    default = param.default
    if isinstance(default, ir.Number):
        return "count" if isinstance(default.value, int) else "number"
    if isinstance(default, ir.Percent):
        return "percent"
    if isinstance(default, ir.String):
        return "text"
    return "set" if all(isinstance(w, ir.Name) and w.id in SETS for w in param_words(param)) else "enum"


def param_words(param: ir.Param) -> list[ir.Expr]:
    """A parameter's default and choices."""
    return [param.default, *(param.domain.options if isinstance(param.domain, ir.ChoiceDomain) else ())]


def fits(actual: ValueType, accepts: tuple[ValueType, ...]) -> bool:
    return actual in accepts or (actual == "count" and "number" in accepts)


def _describe(types: tuple[ValueType, ...]) -> str:
    words = {"number": "a number", "count": "a whole number", "percent": "a percentage", "schedule": "a schedule",
             "score": "a per-token score", "feature": "per-token features", "condition": "a condition",
             "set": "a token set", "flow": "a flow like `text -> vision`", "range": "a layer range like `2..-2`",
             "enum": "a word", "text": "a string"}
    parts = [words[t] for t in types]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def expect(expr: ir.Expr, accepts: tuple[ValueType, ...], ctx: Context, what: str) -> ValueType:
    """Infer `expr`'s type and fail unless it is one of `accepts`."""
    actual = infer(expr, ctx)
    if not fits(actual, accepts):
        hint = None
        if actual == "feature" and "score" in accepts:
            hint = "features are vectors; rank by a score such as attention(...), or select with `diverse`"
        elif actual == "number" and "count" in accepts:
            hint = "counts are whole numbers: write 64, a percentage like 11%, or round(...)"
        elif actual == "score" and "set" in accepts:
            hint = "turn a score into a set with `top N of <set> by <score>` or `<set> where <condition>`"
        raise PolicyError.at(f"{what} must be {_describe(accepts)}, not {_describe((actual,))}", expr.span, hint)
    return actual


def infer(expr: ir.Expr, ctx: Context) -> ValueType:
    match expr:
        case ir.Number(value=value):
            return "count" if isinstance(value, int) else "number"
        case ir.Percent(value=value):
            if not 0 <= value <= 100:
                raise PolicyError.at(f"percentage {value}% is outside 0%..100%", expr.span)
            return "percent"
        case ir.String():
            return "text"
        case ir.Name(id=name):
            return _name(name, expr.span, ctx)
        case ir.Flow():
            raise PolicyError.at("`->` describes an attention flow and only goes inside attention(...)", expr.span,
                                 "write attention(text -> vision)")
        case ir.Range():
            raise PolicyError.at("a range `a..b` only goes in an option that takes layers", expr.span,
                                 "write attention(cls -> vision, layers=2..-2)")
        case ir.Call():
            return _call(expr, ctx)
        case ir.ListExpr(items=items):
            return _schedule_list(expr, items, ctx)
        case ir.Index(base=base, index=index):
            expect(base, ("set",), ctx, "an indexed value")
            expect(index, ("count",), ctx, "an image index")
            return "set"
        case ir.Unary(op="not", operand=operand):
            expect(operand, ("condition",), ctx, "the operand of `not`")
            return "condition"
        case ir.Unary(operand=operand):
            return expect(operand, ("number", "count", "score"), ctx, "the operand of unary '-'")
        case ir.Binary():
            return _binary(expr, ctx)
        case ir.Where(source=source, condition=condition):
            expect(source, ("set",), ctx, "the set before `where`")
            expect(condition, ("condition",), ctx, "the condition after `where`")
            return "set"
        case ir.Select():
            return _select(expr, ctx)
    raise PolicyError.at("unsupported expression", expr.span)


def _name(name: str, span: Span | None, ctx: Context) -> ValueType:
    ctx.uses.append((name, span))
    if name in ctx.visible:
        return ctx.visible[name].type
    if name in ctx.params:
        param = ctx.params[name]
        kind = param_type(param)
        if kind == "set":  # a choice of built-in sets (FastV's `last` or `all` query rows): each must fit here
            for word in param_words(param):
                try:
                    _builtin_set(word.id, span, ctx)  # type: ignore[attr-defined]
                except PolicyError as error:
                    first = error.diagnostics[0]
                    raise PolicyError.at(f"parameter '{name}' can be '{word.id}': {first.message}", span,  # type: ignore[attr-defined]
                                         first.hint) from None
        return kind
    if name in SETS:
        return _builtin_set(name, span, ctx)
    for registry in (SIGNALS,):
        if name in registry:
            spec = registry.specs[name]
            if any(o.required for o in spec.options):
                raise PolicyError.at(f"signal '{name}' needs arguments", span, f"write {spec.signature()}")
            _check_stage(spec, span, ctx)
            return spec.returns
    if name in ctx.later:
        later = ctx.later[name]
        raise PolicyError.at(
            f"cycle: '{name}' is used at {ctx.stage}, which runs before {later.stage} computes it", span,
            f"define '{name}' in a stage that runs before {ctx.stage}")
    if name == DEPTH:
        raise PolicyError.at("`depth` is the model's layer count and only goes in a stage's layer selection", span,
                             "write e.g. stage llm.layer[depth / 2 - 1]")
    candidates = [*ctx.visible, *ctx.params, *(s.name for s in SETS if ctx.kind in s.stages),
                  *(s.name for s in SIGNALS if not any(o.required for o in s.options))]
    best = closest(name, candidates)
    hint = f"did you mean '{best}'?" if best else "define it with param, let or score; `policyc list` shows built-ins"
    raise PolicyError.at(f"unknown name '{name}'", span, hint)


def _builtin_set(name: str, span: Span | None, ctx: Context) -> ValueType:
    spec = SETS.specs[name]
    if ctx.kind not in spec.stages:
        reason = "no text exists before the LLM" if "llm" in spec.stages and len(spec.stages) == 1 else spec.summary
        raise PolicyError.at(f"token set '{name}' is not available in {_STAGE_WORDS[ctx.kind]}: {reason}", span,
                             "text-guided signals belong in llm.layer[...] stages" if spec.stages == {"llm"}
                             else None)
    if name == "dropped" and not ctx.drops_before:
        raise PolicyError.at("'dropped' is empty here: no earlier statement of this stage drops tokens", span,
                             "use `dropped` after a keep, drop or merge in the same stage")
    return "set"


def _check_stage(spec: Spec, span: Span | None, ctx: Context) -> None:
    if ctx.kind not in spec.stages:
        where = ", ".join(sorted(spec.stages))
        raise PolicyError.at(f"{spec.kind} '{spec.name}' is not available in {_STAGE_WORDS[ctx.kind]}", span,
                             f"it works in {where} stages")


def _call(call: ir.Call, ctx: Context) -> ValueType:
    for registry in (FUNCTIONS, SIGNALS, SCHEDULES):
        if call.fn in registry:
            spec = registry.specs[call.fn]
            break
    else:
        names = [*FUNCTIONS.names(), *SIGNALS.names(), *SCHEDULES.names()]
        hint = suggestion(call.fn, names, "functions")
        if call.fn in SELECTORS or call.fn in SETS:
            hint = f"'{call.fn}' is not a function; see `policyc list`"
        raise PolicyError.at(f"unknown function '{call.fn}'", call.span, hint)
    _check_stage(spec, call.span, ctx)
    bound = check_arguments(spec, call.args, call.kwargs, call.span, ctx)
    if spec.returns == "same":
        first = bound.get(spec.options[0].name)
        return first or "number"
    if spec.kind == "schedule":
        _check_schedule(call, spec, ctx)
    return spec.returns


def check_arguments(spec: Spec, args: tuple[ir.Expr, ...], kwargs: tuple[ir.KwArg, ...], span: Span | None,
                    ctx: Context) -> dict[str, ValueType]:
    """Match arguments to `spec.options`; returns the inferred type of each given option."""
    positional = [o for o in spec.options if o.positional]
    if len(args) > len(positional):
        extra = args[len(positional)]
        takes = f"takes {len(positional)} positional argument{'s' * (len(positional) != 1)}"
        names = ", ".join(f"{o.name}=" for o in spec.options if not o.positional)
        raise PolicyError.at(f"{spec.name}() {takes}", extra.span, f"name the others: {names}" if names else None)
    given = {o.name: (a, a.span) for o, a in zip(positional, args, strict=False)}
    for kwarg in kwargs:
        option = spec.option(kwarg.name)
        if option is None:
            raise PolicyError.at(f"{spec.name}() has no option '{kwarg.name}'", kwarg.span,
                                 suggestion(kwarg.name, [o.name for o in spec.options], "options"))
        if kwarg.name in given:
            raise PolicyError.at(f"option '{kwarg.name}' of {spec.name}() is given twice", kwarg.span)
        given[kwarg.name] = (kwarg.value, kwarg.span)
    for option in spec.options:
        if option.required and option.name not in given:
            raise PolicyError.at(f"{spec.name}() needs '{option.name}' ({option.summary})", span,
                                 f"write {spec.signature()}")
    return {name: _check_option(spec, spec.option(name), value, ctx) for name, (value, _) in given.items()}  # type: ignore[arg-type]


def _check_option(spec: Spec, option: Option, value: ir.Expr, ctx: Context) -> ValueType:
    label = f"option '{option.name}' of {spec.name}()"
    if option.choices:
        words = ", ".join(option.choices)
        if isinstance(value, ir.Name):
            if value.id in option.choices:
                return "enum"
            param = ctx.params.get(value.id)
            if param is not None and param_type(param) == "enum":
                _check_enum_param(param, option, label)
                return "enum"
            known = value.id in ctx.visible or value.id in SIGNALS or value.id in SETS
            if param is None and not known:
                what = f"one of {words}" if option.accepts == ("enum",) else \
                    f"{_describe(tuple(a for a in option.accepts if a != 'enum'))} or one of {words}"
                raise PolicyError.at(f"{label} must be {what}", value.span,
                                     suggestion(value.id, option.choices, "choices"))
        elif option.accepts == ("enum",):
            raise PolicyError.at(f"{label} must be one of {words}", value.span)
    if isinstance(value, ir.Flow) and "flow" in option.accepts:
        expect(value.source, ("set",), ctx, "the query side of a flow")
        expect(value.target, ("set",), ctx, "the key side of a flow")
        return "flow"
    if isinstance(value, ir.Range) and "range" in option.accepts:
        for end in (value.start, value.stop):
            expect(end, ("count",), ctx, f"an end of the range of {label}")
            _check_bounds(end, option, label)
        return "range"
    actual = expect(value, option.accepts, ctx, label)
    _check_bounds(value, option, label)
    return actual


def _check_enum_param(param: ir.Param, option: Option, label: str) -> None:
    for word in param_words(param):
        if not isinstance(word, ir.Name) or word.id not in option.choices:
            shown = word.id if isinstance(word, ir.Name) else "a non-word value"
            raise PolicyError.at(f"parameter '{param.name}' can be {shown}, which {label} does not accept",
                                 word.span, f"choices: {', '.join(option.choices)}")


def _check_bounds(value: ir.Expr, option: Option, label: str) -> None:
    if not isinstance(value, ir.Number):
        return
    if option.integer and not isinstance(value.value, int):
        raise PolicyError.at(f"{label} must be a whole number", value.span)
    if option.low is not None and value.value < option.low:
        raise PolicyError.at(f"{label} must be at least {option.low:g}, not {value.value}", value.span)
    if option.high is not None and value.value > option.high:
        raise PolicyError.at(f"{label} must be at most {option.high:g}, not {value.value}", value.span)


def _check_schedule(call: ir.Call, spec: Spec, ctx: Context) -> None:
    if spec.multi_layer and ctx.layers == 1:
        raise PolicyError.at(f"{spec.name}() varies across layers, but this stage runs at one layer", call.span,
                             "give the stage several layers, e.g. llm.layer[2, 6, 10]")


def _schedule_list(expr: ir.ListExpr, items: tuple[ir.Expr, ...], ctx: Context) -> ValueType:
    kinds = {expect(item, ("count", "percent"), ctx, "a budget in a list") for item in items}
    if len(kinds) > 1:
        raise PolicyError.at("a budget list mixes counts and percentages", expr.span, "use one kind throughout")
    if ctx.layers is not None and len(items) != ctx.layers:
        raise PolicyError.at(f"{len(items)} budgets for a stage that runs at {ctx.layers} layers", expr.span,
                             "give one budget per layer of the stage")
    literals = [(i.value, i) for i in items if isinstance(i, ir.Number | ir.Percent)]
    for (before, _), (after, item) in itertools.pairwise(literals):
        if after > before:
            raise PolicyError.at(f"budget grows from {before} to {after} within the schedule", item.span,
                                 "budgets can only shrink from one layer to the next")
    return "schedule"


def _binary(expr: ir.Binary, ctx: Context) -> ValueType:
    op = expr.op
    if op in ("and", "or"):
        expect(expr.left, ("condition",), ctx, f"the left side of `{op}`")
        expect(expr.right, ("condition",), ctx, f"the right side of `{op}`")
        return "condition"
    left, right = infer(expr.left, ctx), infer(expr.right, ctx)
    if op in ("|", "&") or (op == "-" and "set" in (left, right)):
        for side, actual in ((expr.left, left), (expr.right, right)):
            if actual != "set":
                raise PolicyError.at(f"`{op}` combines token sets; this side is {_describe((actual,))}", side.span)
        return "set"
    for side, actual in ((expr.left, left), (expr.right, right)):
        if actual not in _NUMERIC:
            hint = "percentages do not combine with arithmetic; write the result, e.g. 20%" \
                if actual == "percent" else None
            raise PolicyError.at(f"`{op}` needs numbers or scores, not {_describe((actual,))}", side.span, hint)
    if op in ("<", "<=", ">", ">=", "==", "!="):
        return "condition"
    if "score" in (left, right):
        return "score"
    return "count" if left == right == "count" and op in ("+", "-", "*") else "number"


def _select(select: ir.Select, ctx: Context) -> ValueType:
    spec = SELECTORS.get(select.selector, select.span)
    _check_stage(spec, select.span, ctx)
    check_arguments(spec, (), select.options, select.span, ctx)
    amount = expect(select.amount, AMOUNT, ctx, f"the amount of `{select.selector}`")
    expect(select.source, ("set",), ctx, f"what `{select.selector}` selects from")
    _check_allocation(select, amount, ctx)
    if spec.by is not None and select.by is not None:
        expect(select.by, (spec.by,), ctx, f"what `{select.selector}` ranks by")
    return "set"


def _check_allocation(select: ir.Select, amount: ValueType, ctx: Context) -> None:
    """`allocate=` splits one budget across a sample's images: it needs a count or a percentage (the budget) and a
    set that can hold several images (not one image, `vision[i]`)."""
    allocate = next((k for k in select.options if k.name == "allocate"), None)
    if allocate is None:
        return
    value = allocate.value
    if isinstance(value, ir.Name) and value.id in ctx.params and param_type(ctx.params[value.id]) == "enum":
        words = {w.id for w in param_words(ctx.params[value.id]) if isinstance(w, ir.Name)}
        if words == {"none"}:
            return
    elif isinstance(value, ir.Name) and value.id == "none":
        return
    if amount not in ("count", "percent"):
        raise PolicyError.at(f"`{select.selector}(allocate=...)` splits one budget across a sample's images; "
                             f"this amount is {_describe((amount,))}", select.amount.span,
                             "give the budget as a count (64) or a percentage of the sample's image tokens (25%)")
    source = select.source
    while isinstance(source, ir.Where):
        source = source.source
    if isinstance(source, ir.Index):
        raise PolicyError.at(f"`{select.selector}(allocate=...)` splits a budget across images, but it selects from "
                             "one image's tokens", source.span,
                             "select from every image (`vision`), or leave out allocate= for one image")
