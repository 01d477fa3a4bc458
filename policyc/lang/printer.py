"""The one canonical text form of a policy (`policyc fmt`). `parse(print_file(f)) == f` always.

Layout: two-space indentation; metadata, then params, uses and stages; one statement per line;
the fewest parentheses that keep the tree; numbers as Python writes them (`0.0001`, `1e-05`).
"""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from policyc.lang import ir

# Canonical order of a policy's metadata lines (the builder stores `Policy.meta` in this order too).
META_ORDER = ("title", "paper", "description")
# The metadata a search takes.
SEARCH_META = ("title", "description")

# Binding strength of each operator: a child binding looser than its parent gets parentheses.
_PRECEDENCE = {"or": 1, "and": 2, "<": 4, "<=": 4, ">": 4, ">=": 4, "==": 4, "!=": 4,
               "|": 5, "&": 6, "+": 7, "-": 7, "*": 8, "/": 8}
_SELECT, _WHERE, _NOT, _UNARY, _POSTFIX, _ATOM = 0, 0.5, 3, 9, 10, 11


def print_file(file: ir.PolicyFile) -> str:
    imports = [line for i in file.imports for line in _lines(i, _import(i), 0)]
    blocks = ([imports] if imports else []) + [_policy(p) for p in file.policies] + [_search(s) for s in file.searches]
    text = "\n\n".join("\n".join(block) for block in blocks)
    tail = "\n".join(_comment(c, 0) for c in file.end_comments)
    return (text + ("\n\n" if text and tail else "") + tail).rstrip("\n") + "\n" if text or tail else ""


def print_policy(policy: ir.Policy) -> str:
    return "\n".join(_policy(policy)) + "\n"


def print_expr(expr: ir.Expr) -> str:
    return _expr(expr)


def print_statement(statement: ir.Statement) -> str:
    """The one-line canonical form of a statement, without its comments."""
    return _statement(statement)


def _comment(text: str, depth: int) -> str:
    return "  " * depth + "#" + text


def _lines(node: ir.Commented, text: str, depth: int) -> list[str]:
    note = f"  #{node.note}" if node.note is not None else ""
    return [*(_comment(c, depth) for c in node.comments), "  " * depth + text + note]


def _block(node: ir.Commented, header: str, depth: int, body: list[list[str]], end: Iterable[str]) -> list[str]:
    end_lines = [_comment(c, depth + 1) for c in end]
    if not body and not end_lines and node.note is None:
        return _lines(node, header + " {}", depth)
    lines = _lines(node, header + " {", depth)
    for index, group in enumerate(body):
        lines.extend([""] * (index > 0) + group)
    return [*lines, *end_lines, "  " * depth + "}"]


def _import(node: ir.Import) -> str:
    return f"import {_quote(node.path)}" + (f" as {node.alias}" if node.alias else "")


def _policy(policy: ir.Policy) -> list[str]:
    meta = sorted(policy.meta, key=lambda m: META_ORDER.index(m.key))
    groups = [[line for m in meta for line in _lines(m, f"{m.key} {_quote(m.value)}", 1)]]
    groups.append([line for p in policy.params for line in _lines(p, _param(p), 1)])
    groups.append([line for u in policy.uses for line in _lines(u, _use(u), 1)])
    groups = [g for g in groups if g]
    groups += [_stage(s) for s in policy.stages]
    return _block(policy, f"policy {policy.name}", 0, groups, policy.end_comments)


def _param(param: ir.Param) -> str:
    text = f"param {param.name} = {_expr(param.default)}"
    return text + (f" {domain_text(param.domain)}" if param.domain is not None else "")


def domain_text(domain: ir.RangeDomain | ir.ChoiceDomain) -> str:
    """`in [5%, 50%] step 5%`, `in [1, 64] log`, `in {last, all}`."""
    if isinstance(domain, ir.ChoiceDomain):
        return "in {" + ", ".join(_expr(o) for o in domain.options) + "}"
    text = f"in [{_expr(domain.low)}, {_expr(domain.high)}]"
    text += f" step {_expr(domain.step)}" if domain.step is not None else ""
    return text + (" log" if domain.log else "")


def print_search(search: ir.Search) -> str:
    return "\n".join(_search(search)) + "\n"


def _search(search: ir.Search) -> list[str]:
    meta = sorted(search.meta, key=lambda m: META_ORDER.index(m.key))
    groups = [[line for m in meta for line in _lines(m, f"{m.key} {_quote(m.value)}", 1)]]
    if search.choose is not None:
        groups.append(_lines(search.choose, "choose { " + ", ".join(n.id for n in search.choose.policies) + " }", 1))
    groups.append([line for p in search.params for line in _lines(p, search_param_text(p), 1)])
    return _block(search, f"search {search.name}", 0, [g for g in groups if g], search.end_comments)


def search_param_text(param: ir.SearchParam) -> str:
    """`fastv.ratio in [5%, 50%]` or `fastv.rows = last`."""
    if param.domain is not None:
        return f"{param.dotted} {domain_text(param.domain)}"
    return f"{param.dotted} = {_expr(param.value)}"  # type: ignore[arg-type]


def _use(use: ir.Use) -> str:
    text = f"use {use.policy}" + (f".{use.stage}" if use.stage else "")
    return text + (f"({_kwargs(use.overrides)})" if use.overrides else "")


def _stage(stage: ir.Stage) -> list[str]:
    header = f"stage {hook_text(stage.hook)}" + (f" as {stage.name}" if stage.name else "")
    body = [line for s in stage.body for line in _lines(s, _statement(s), 2)]
    return _block(stage, header, 1, [body] if body else [], stage.end_comments)


def hook_text(hook: ir.Hook) -> str:
    """`llm.layer[2, 6..14 step 4]`, `encoder.layer[*].attention`, `decode`."""
    parts = list(hook.parts)
    if hook.layers is None:
        return ".".join(parts)
    selection = "*" if isinstance(hook.layers, ir.AllLayers) else ", ".join(_layer(i) for i in hook.layers.items)
    head, tail = parts[: hook.layers_after], parts[hook.layers_after :]
    return ".".join(head) + f"[{selection}]" + "".join("." + p for p in tail)


def _layer(item: ir.LayerRange) -> str:
    text = _expr(item.start, 7)
    if item.stop is not None:
        text += f"..{_expr(item.stop, 7)}"
        if item.step is not None:
            text += f" step {_expr(item.step, 7)}"
    return text


def _statement(statement: ir.Statement) -> str:
    match statement:
        case ir.Let(name=name, value=value):
            return f"let {name} = {_expr(value)}"
        case ir.ScoreDef(name=name, value=value):
            return f"score {name} = {_expr(value)}"
        case ir.Keep(target=target):
            return f"keep {_expr(target)}"
        case ir.Drop(target=target):
            return f"drop {_expr(target)}"
        case ir.Protect(target=target):
            return f"protect {_expr(target)}"
        case ir.Merge():
            text = f"merge {statement.method}" + _options(statement.options) + f" of {_expr(statement.source, _WHERE)}"
            if statement.into is not None:
                text += f" into {_expr(statement.into, _WHERE)}"
            return text + (f" by {_expr(statement.by, 1)}" if statement.by is not None else "")
        case ir.Positions(mode=mode):
            return f"positions {mode}"
        case ir.Cache(method=method, options=options):
            return f"cache {method}" + _options(options)
    raise TypeError(f"not a statement: {statement!r}")


def _options(options: tuple[ir.KwArg, ...]) -> str:
    return f"({_kwargs(options)})" if options else ""


def _kwargs(kwargs: Iterable[ir.KwArg]) -> str:
    return ", ".join(f"{k.name}={_arg(k.value)}" for k in kwargs)


def _arg(expr: ir.Expr) -> str:
    if isinstance(expr, ir.Flow):
        return f"{_expr(expr.source, 1)} -> {_expr(expr.target, 1)}"
    if isinstance(expr, ir.Range):
        return f"{_expr(expr.start, 7)}..{_expr(expr.stop, 7)}"
    return _expr(expr)


def _quote(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return f'"{escaped}"'


def _number(value: int | float) -> str:
    """A number as Python writes it; -0.0 as 0.0 (equal values, and `-0.0` would read back as `-(0.0)`)."""
    return repr(value + 0.0 if value == 0 and isinstance(value, float) else value)


def _percent(value: int | float) -> str:
    """`8%`, `0.5%`, `0.00001%`: the PERCENT token has no exponent, so floats are written out in full."""
    if isinstance(value, int) or value == 0:
        return f"{_number(value)}%"
    text = format(Decimal(repr(value)), "f")  # exact: repr is the shortest string that reads back as `value`
    return f"{text if '.' in text else text + '.0'}%"


def _wrap(text: str, own: float, context: float) -> str:
    return f"({text})" if own < context else text


def _expr(expr: ir.Expr, context: float = 0) -> str:
    """`expr` printed inside a position that needs at least binding strength `context`."""
    match expr:
        case ir.Number(value=value):
            return _wrap(_number(value), _UNARY if value < 0 else _ATOM, context)
        case ir.Percent(value=value):
            return _wrap(_percent(value), _UNARY if value < 0 else _ATOM, context)
        case ir.String(value=value):
            return _quote(value)
        case ir.Name(id=name):
            return name
        case ir.Call(fn=fn, args=args, kwargs=kwargs):
            parts = [_arg(a) for a in args] + [f"{k.name}={_arg(k.value)}" for k in kwargs]
            return f"{fn}({', '.join(parts)})"
        case ir.Flow() | ir.Range():
            return f"({_arg(expr)})"  # only valid as an argument; parenthesised elsewhere
        case ir.ListExpr(items=items):
            return "[" + ", ".join(_expr(i) for i in items) + "]"
        case ir.Index(base=base, index=index):
            return f"{_expr(base, _POSTFIX)}[{_expr(index)}]"
        case ir.Unary(op="-", operand=operand):
            inner = _expr(operand, _UNARY)
            return _wrap("-" + inner, _UNARY, context)
        case ir.Unary(op="not", operand=operand):
            return _wrap("not " + _expr(operand, _NOT), _NOT, context)
        case ir.Binary(op=op, left=left, right=right):
            own = _PRECEDENCE[op]
            # Comparisons do not chain; arithmetic and logic are left-associative.
            left_context = own + 0.5 if own == 4 else own
            text = f"{_expr(left, left_context)} {op} {_expr(right, own + 0.5)}"
            return _wrap(text, own, context)
        case ir.Where(source=source, condition=condition):
            return _wrap(f"{_expr(source, 1)} where {_expr(condition, 1)}", _WHERE, context)
        case ir.Select():
            return _wrap(_select(expr), _SELECT, context)
    raise TypeError(f"not an expression: {expr!r}")


def _select(select: ir.Select) -> str:
    text = select.selector + _options(select.options) + f" {_expr(select.amount, 7)} of {_expr(select.source)}"
    return text + (f" by {_expr(select.by, 1)}" if select.by is not None else "")
