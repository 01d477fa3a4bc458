"""Lark tree -> IR (`PolicyFile`), then comments attached to the nodes they annotate."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, TypeVar

from lark import Token, Transformer, Tree, v_args
from lark.exceptions import VisitError
from lark.tree import Meta as LarkMeta

from policyc.errors import PolicyError, Span
from policyc.lang import ir
from policyc.lang.comments import attach_comments
from policyc.lang.parser import parse_tree, scan_comments
from policyc.lang.printer import META_ORDER, SEARCH_META

_ESCAPES = {"\\": "\\", '"': '"', "n": "\n", "t": "\t"}

# How deeply the syntax tree (file > policy > stage > statement > expression ...) may nest. Everything
# downstream (building, printing, checking, comparing IR) recurses per level, so unbounded nesting such
# as `not not ... x` or `a + a + ... + a` would end in a RecursionError instead of a diagnostic.
MAX_NESTING = 128
# Integers with more digits than this are far outside the float range (and Python refuses to convert
# decimal strings of more than 4300 digits to int at all).
_MAX_INT_DIGITS = 400


def parse(text: str, file: str = "<string>") -> ir.PolicyFile:
    """Parse `.tokpol` source into IR. Raises `PolicyError` for any syntax problem."""
    tree = parse_tree(text, file)
    _check_nesting(tree, text, file)
    try:
        built: ir.PolicyFile = _Builder(file).transform(tree)
    except VisitError as error:
        if isinstance(error.orig_exc, PolicyError):
            raise error.orig_exc.with_source(text) from None
        raise
    return attach_comments(built, scan_comments(text))


def parse_value(text: str, name: str = "<value>") -> ir.Number | ir.Percent | ir.String | ir.Name:
    """A literal as a parameter default is written (`25%`, `0.5`, `64`, `max`), e.g. from the command line."""
    try:
        file = parse(f"policy value {{ param value = {text} }}", name)
    except PolicyError:
        raise PolicyError.at(f"{name}: '{text}' is not a value", None,
                             "write a number (64, 0.5), a percentage (25%), a word or a \"string\"") from None
    policies = file.policies
    if len(policies) != 1 or len(policies[0].params) != 1 or policies[0].params[0].domain is not None:
        raise PolicyError.at(f"{name}: '{text}' is not a single value", None)
    return policies[0].params[0].default


def _check_nesting(tree: Tree, text: str, file: str) -> None:
    """Reject trees deeper than `MAX_NESTING` levels (iteratively, so the check itself cannot overflow)."""
    stack: list[tuple[Tree, int, Span | None]] = [(tree, 1, None)]
    while stack:
        node, depth, outer = stack.pop()
        span = _span(file, node.meta) or outer
        if depth > MAX_NESTING:
            raise PolicyError.at(f"nesting is too deep (more than {MAX_NESTING} levels)", span,
                                 "name parts of the expression with `let` or `score`", text)
        stack.extend((child, depth + 1, span) for child in node.children if isinstance(child, Tree))


N = TypeVar("N", bound=ir.Node)


def _node(cls: type[N], **fields: Any) -> N:
    """An IR node built without re-validation: the grammar already guarantees its shape, and
    skipping pydantic's validators keeps `policyc check` fast (no schema build at start-up)."""
    return cls.model_construct(**fields)


def _span(file: str, meta: LarkMeta | Token) -> Span | None:
    if isinstance(meta, Token):
        if meta.line is None:
            return None
        return Span(file, meta.line, meta.column or 1, meta.end_line or meta.line, meta.end_column or 1)
    if getattr(meta, "empty", True):
        return None
    return Span(file, meta.line, meta.column, meta.end_line, meta.end_column)


def _number(token: Token, file: str) -> int | float:
    """The value of a NUMBER token (digits only: int, otherwise float); values beyond float range are errors."""
    text = str(token)
    value: int | float
    if text.isdigit():
        digits = text.lstrip("0") or "0"
        value = int(digits) if len(digits) <= _MAX_INT_DIGITS else math.inf
        finite = value <= sys.float_info.max
    else:
        value = float(text)
        finite = math.isfinite(value)
    if not finite:
        shown = text if len(text) <= 24 else text[:20] + "..."
        raise PolicyError.at(f"number {shown} is too large", _span(file, token), "use a finite number")
    return value


def _percent_digits(token: Token) -> Token:
    """The NUMBER part of a PERCENT token, keeping the token's position for diagnostics."""
    return Token("NUMBER", token[:-1], line=token.line, column=token.column, end_line=token.end_line,
                 end_column=token.end_column)


def _string(token: Token, file: str) -> str:
    body, out, index = str(token)[1:-1], [], 0
    while index < len(body):
        char = body[index]
        if char == "\\":
            escape = body[index + 1]  # the STRING regex guarantees a character after '\'
            if escape not in _ESCAPES:
                column = (token.column or 1) + 1 + index  # strings never span lines
                span = Span(file, token.line or 1, column, token.line or 1, column + 2)
                raise PolicyError.at(f"unknown escape '\\{escape}' in string", span, 'use \\" \\\\ \\n or \\t')
            out.append(_ESCAPES[escape])
            index += 2
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _kwargs(node: Any) -> tuple[ir.KwArg, ...]:
    """Options `( ... )` arrive as None, an `options` list, or a `kwargs` tuple."""
    if node is None:
        return ()
    return tuple(node)


@v_args(meta=True, inline=True)
class _Builder(Transformer):
    """Bottom-up conversion; every node gets the span of the text it came from."""

    def __init__(self, file: str) -> None:
        super().__init__()
        self.file = file

    def _at(self, meta: LarkMeta) -> Span | None:
        return _span(self.file, meta)

    # -- file structure
    def start(self, meta: LarkMeta, *items: Any) -> ir.PolicyFile:
        imports = tuple(i for i in items if isinstance(i, ir.Import))
        policies = tuple(i for i in items if isinstance(i, ir.Policy))
        searches = tuple(i for i in items if isinstance(i, ir.Search))
        return _node(ir.PolicyFile, imports=imports, policies=policies, searches=searches, span=self._at(meta))

    def import_decl(self, meta: LarkMeta, path: Token, alias: Token | None) -> ir.Import:
        return _node(ir.Import, path=_string(path, self.file), alias=str(alias) if alias else None, span=self._at(meta))

    def policy(self, meta: LarkMeta, name: Token, *members: Any) -> ir.Policy:
        # Metadata in canonical order (the printer's), so that parse(print(parse(text))) == parse(text).
        ordered_meta = sorted((m for m in members if isinstance(m, ir.Meta)), key=lambda m: META_ORDER.index(m.key))
        return _node(ir.Policy,
            name=str(name),
            meta=tuple(ordered_meta),
            params=tuple(m for m in members if isinstance(m, ir.Param)),
            uses=tuple(m for m in members if isinstance(m, ir.Use)),
            stages=tuple(m for m in members if isinstance(m, ir.Stage)),
            span=self._at(meta),
        )

    # -- searches
    def search(self, meta: LarkMeta, name: Token, *members: Any) -> ir.Search:
        chooses = [m for m in members if isinstance(m, ir.Choose)]
        if len(chooses) > 1:
            raise PolicyError.at(f"search '{name}' has more than one `choose`", chooses[1].span,
                                 "list every candidate policy in one `choose { a, b, c }`")
        metas = [m for m in members if isinstance(m, ir.Meta)]
        for item in metas:
            if item.key not in SEARCH_META:
                raise PolicyError.at(f"a search takes no `{item.key}`", item.span,
                                     "a search has a `title` and a `description`; papers belong to policies")
        return _node(ir.Search,
            name=str(name),
            meta=tuple(sorted(metas, key=lambda m: META_ORDER.index(m.key))),
            choose=chooses[0] if chooses else None,
            params=tuple(m for m in members if isinstance(m, ir.SearchParam)),
            span=self._at(meta),
        )

    def choose(self, meta: LarkMeta, *names: ir.Name | None) -> ir.Choose:
        return _node(ir.Choose, policies=tuple(n for n in names if n is not None), span=self._at(meta))

    def dotted_name(self, meta: LarkMeta, *parts: Token) -> ir.Name:
        return _node(ir.Name, id=".".join(parts), span=self._at(meta))

    def narrow(self, meta: LarkMeta, target: ir.Name, domain: Any) -> ir.SearchParam:
        return _node(ir.SearchParam, target=self._target(target), domain=domain, value=None, span=self._at(meta))

    def fix(self, meta: LarkMeta, target: ir.Name, value: Any) -> ir.SearchParam:
        return _node(ir.SearchParam, target=self._target(target), domain=None, value=value, span=self._at(meta))

    def _target(self, target: ir.Name) -> tuple[str, ...]:
        if "." not in target.id:
            raise PolicyError.at(f"'{target.id}' does not say which policy's parameter it is", target.span,
                                 f"write POLICY.PARAM, e.g. fastv.{target.id}")
        return tuple(target.id.split("."))

    def meta(self, meta: LarkMeta, key: Token, value: Token) -> ir.Meta:
        return _node(ir.Meta, key=str(key), value=_string(value, self.file), span=self._at(meta))

    # -- parameters
    def param(self, meta: LarkMeta, name: Token, default: Any, domain: Any) -> ir.Param:
        return _node(ir.Param, name=str(name), default=default, domain=domain, span=self._at(meta))

    def range_domain(self, meta: LarkMeta, low: Any, high: Any, step_kw: Token | None, step: Any,
                     log: Token | None) -> ir.RangeDomain:
        for bound in (low, high, step):
            if bound is not None and not isinstance(bound, ir.Number | ir.Percent):
                raise PolicyError.at("range bounds and steps must be numbers or percentages", bound.span,
                                     "write `in {a, b, c}` for a set of choices")
        return _node(ir.RangeDomain, low=low, high=high, step=step, log=log is not None, span=self._at(meta))

    def choice_domain(self, meta: LarkMeta, *options: Any) -> ir.ChoiceDomain:
        return _node(ir.ChoiceDomain, options=options, span=self._at(meta))

    def literal(self, meta: LarkMeta, value: Any) -> Any:
        if isinstance(value, ir.Node):
            return value
        span = self._at(meta)
        if value.type == "PERCENT":
            return _node(ir.Percent, value=_number(_percent_digits(value), self.file), span=span)
        if value.type == "STRING":
            return _node(ir.String, value=_string(value, self.file), span=span)
        return _node(ir.Name, id=str(value), span=span)

    def signed_number(self, meta: LarkMeta, minus: Token | None, number: Token) -> ir.Number:
        value = _number(number, self.file)
        return _node(ir.Number, value=-value if minus else value, span=self._at(meta))

    # -- reuse and stages
    def use(self, meta: LarkMeta, policy: Token, stage: Token | None, overrides: Any) -> ir.Use:
        return _node(ir.Use, policy=str(policy), stage=str(stage) if stage else None, overrides=_kwargs(overrides),
                      span=self._at(meta))

    def stage(self, meta: LarkMeta, hook: ir.Hook, name: Token | None, *body: Any) -> ir.Stage:
        return _node(ir.Stage, hook=hook, name=str(name) if name else None, body=body, span=self._at(meta))

    def hook(self, meta: LarkMeta, *parts: Any) -> ir.Hook:
        names = tuple(str(p) for p in parts if isinstance(p, Token))
        selections = [(i, p) for i, p in enumerate(parts) if not isinstance(p, Token)]
        if len(selections) > 1:
            raise PolicyError.at("a hook point takes one layer selection", selections[1][1].span,
                                 "list several layers in one selection: llm.layer[2, 6, 10]")
        layers, after = (selections[0][1], selections[0][0]) if selections else (None, 0)
        return _node(ir.Hook, parts=names, layers=layers, layers_after=after, span=self._at(meta))

    def all_layers(self, meta: LarkMeta) -> ir.AllLayers:
        return _node(ir.AllLayers, span=self._at(meta))

    def layers(self, meta: LarkMeta, *items: ir.LayerRange) -> ir.LayerList:
        return _node(ir.LayerList, items=items, span=self._at(meta))

    def layer_item(self, meta: LarkMeta, start: Any, stop: Any, step: Any) -> ir.LayerRange:
        return _node(ir.LayerRange, start=start, stop=stop, step=step, span=self._at(meta))

    # -- statements
    def let(self, meta: LarkMeta, name: Token, value: Any) -> ir.Let:
        return _node(ir.Let, name=str(name), value=value, span=self._at(meta))

    def score_def(self, meta: LarkMeta, name: Token, value: Any) -> ir.ScoreDef:
        return _node(ir.ScoreDef, name=str(name), value=value, span=self._at(meta))

    def keep(self, meta: LarkMeta, target: Any) -> ir.Keep:
        return _node(ir.Keep, target=target, span=self._at(meta))

    def drop(self, meta: LarkMeta, target: Any) -> ir.Drop:
        return _node(ir.Drop, target=target, span=self._at(meta))

    def protect(self, meta: LarkMeta, target: Any) -> ir.Protect:
        return _node(ir.Protect, target=target, span=self._at(meta))

    def merge(self, meta: LarkMeta, method: Token, options: Any, source: Any, into: Any, by: Any) -> ir.Merge:
        return _node(ir.Merge, method=str(method), options=_kwargs(options), source=source, into=into, by=by,
                        span=self._at(meta))

    def positions(self, meta: LarkMeta, mode: Token) -> ir.Positions:
        return _node(ir.Positions, mode=str(mode), span=self._at(meta))

    def cache(self, meta: LarkMeta, method: Token, options: Any) -> ir.Cache:
        return _node(ir.Cache, method=str(method), options=_kwargs(options), span=self._at(meta))

    def options(self, meta: LarkMeta, kwargs: Any) -> tuple[ir.KwArg, ...]:
        return _kwargs(kwargs)

    def kwargs(self, meta: LarkMeta, *items: ir.KwArg) -> tuple[ir.KwArg, ...]:
        return items

    def kwarg(self, meta: LarkMeta, name: Token, value: Any) -> ir.KwArg:
        return _node(ir.KwArg, name=str(name), value=value, span=self._at(meta))

    # -- expressions
    def selection(self, meta: LarkMeta, selector: Token, *rest: Any) -> ir.Select:
        if len(rest) == 2:  # grid, stride and plug-in selectors without `by`
            amount, source = rest
            options, by = None, None
        else:
            options, amount, source, by = rest
        return _node(ir.Select, selector=str(selector), options=_kwargs(options), amount=amount, source=source, by=by,
                         span=self._at(meta))

    def where(self, meta: LarkMeta, source: Any, condition: Any) -> ir.Where:
        return _node(ir.Where, source=source, condition=condition, span=self._at(meta))

    def _binary(self, meta: LarkMeta, op: str, left: Any, right: Any) -> ir.Binary:
        return _node(ir.Binary, op=op, left=left, right=right, span=self._at(meta))

    def or_(self, meta: LarkMeta, left: Any, right: Any) -> ir.Binary:
        return self._binary(meta, "or", left, right)

    def and_(self, meta: LarkMeta, left: Any, right: Any) -> ir.Binary:
        return self._binary(meta, "and", left, right)

    def not_(self, meta: LarkMeta, operand: Any) -> ir.Unary:
        return _node(ir.Unary, op="not", operand=operand, span=self._at(meta))

    def compare(self, meta: LarkMeta, left: Any, op: Token, right: Any) -> ir.Binary:
        return self._binary(meta, str(op), left, right)

    def set_union(self, meta: LarkMeta, left: Any, right: Any) -> ir.Binary:
        return self._binary(meta, "|", left, right)

    def set_intersection(self, meta: LarkMeta, left: Any, right: Any) -> ir.Binary:
        return self._binary(meta, "&", left, right)

    def binary(self, meta: LarkMeta, left: Any, op: Token, right: Any) -> ir.Binary:
        return self._binary(meta, str(op), left, right)

    def negate(self, meta: LarkMeta, _minus: Token, operand: Any) -> ir.Expr:
        if isinstance(operand, ir.Number | ir.Percent) and operand.value > 0:
            return _node(type(operand), value=-operand.value, span=self._at(meta))
        return _node(ir.Unary, op="-", operand=operand, span=self._at(meta))

    def index(self, meta: LarkMeta, base: Any, index: Any) -> ir.Index:
        return _node(ir.Index, base=base, index=index, span=self._at(meta))

    def number(self, meta: LarkMeta, token: Token) -> ir.Number:
        return _node(ir.Number, value=_number(token, self.file), span=self._at(meta))

    def percent(self, meta: LarkMeta, token: Token) -> ir.Percent:
        return _node(ir.Percent, value=_number(_percent_digits(token), self.file), span=self._at(meta))

    def string(self, meta: LarkMeta, token: Token) -> ir.String:
        return _node(ir.String, value=_string(token, self.file), span=self._at(meta))

    def name(self, meta: LarkMeta, token: Token) -> ir.Name:
        return _node(ir.Name, id=str(token), span=self._at(meta))

    def call(self, meta: LarkMeta, fn: Token, arguments: Sequence[Any] | None) -> ir.Call:
        arguments = arguments or ()
        positional = tuple(a for a in arguments if not isinstance(a, ir.KwArg))
        keywords = tuple(a for a in arguments if isinstance(a, ir.KwArg))
        first_keyword = next((i for i, a in enumerate(arguments) if isinstance(a, ir.KwArg)), len(arguments))
        if any(not isinstance(a, ir.KwArg) for a in arguments[first_keyword:]):
            late = next(a for a in arguments[first_keyword:] if not isinstance(a, ir.KwArg))
            raise PolicyError.at("positional argument after a keyword argument", late.span,
                                 f"put positional arguments of '{fn}' first")
        return _node(ir.Call, fn=str(fn), args=positional, kwargs=keywords, span=self._at(meta))

    def args(self, meta: LarkMeta, *items: Any) -> tuple[Any, ...]:
        return items

    def flow(self, meta: LarkMeta, source: Any, target: Any) -> ir.Flow:
        return _node(ir.Flow, source=source, target=target, span=self._at(meta))

    def layer_span(self, meta: LarkMeta, start: Any, stop: Any) -> ir.Range:
        return _node(ir.Range, start=start, stop=stop, span=self._at(meta))

    def list(self, meta: LarkMeta, *items: Any) -> ir.ListExpr:
        return _node(ir.ListExpr, items=tuple(i for i in items if i is not None), span=self._at(meta))
