"""The policy IR: frozen pydantic models, one canonical printed form (see `printer.py`).

Every node carries an optional source `span` for diagnostics. Spans are excluded from
equality, hashing and serialisation, so `parse(print(p)) == p` compares meaning, not layout.
Comments are part of the IR (leading lines and a trailing note) so `policyc fmt` loses nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policyc.errors import Span

FORMAT_VERSION = 1


class Node(BaseModel):
    """Base of every IR node: immutable, strict about unknown fields, span-blind equality."""

    model_config = ConfigDict(frozen=True, extra="forbid", defer_build=True)

    span: Span | None = Field(default=None, exclude=True, repr=False)

    @model_validator(mode="after")
    def _flows_only_in_calls(self) -> Node:
        """`queries -> keys` is only expressible as an argument of a call (`attention(text -> vision)`), and
        a range `a..b` only as the value of a call's keyword argument (`layers=2..-2`)."""
        if isinstance(self, KwArg):  # a KwArg is checked by the node that holds it
            return self
        if isinstance(self, Call):
            if any(isinstance(a, Range) for a in self.args):
                raise ValueError("a range (`a..b`) can only be the value of a keyword argument")
            return self
        for value in self._fields():
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                inner = item.value if isinstance(item, KwArg) else item
                if isinstance(inner, Flow):
                    raise ValueError("a flow (`a -> b`) can only be an argument of a call")
                if isinstance(inner, Range):
                    raise ValueError("a range (`a..b`) can only be the value of a call's keyword argument")
        return self
        for value in self._fields():
            items = value if isinstance(value, tuple) else (value,)
            for item in items:
                if isinstance(item, Range) and not isinstance(self, Call):
                    raise ValueError("a range (`a..b`) can only be the value of a call's keyword argument")
                if isinstance(self, Call):
                    if isinstance(item, Range):
                        raise ValueError("a range (`a..b`) can only be the value of a call's keyword argument")
                    continue
                value_ = item.value if isinstance(item, KwArg) else item
                if isinstance(value_, Flow | Range):
                    what = "a flow (`a -> b`) can only be an argument of a call" if isinstance(value_, Flow) else \
                        "a range (`a..b`) can only be the value of a call's keyword argument"
                    raise ValueError(what)
        return self

    def children(self) -> Iterator[Node]:
        """The nodes directly inside this one (keyword arguments included, as `KwArg` nodes)."""
        for value in self._fields():
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, Node):
                    yield item

    def walk(self) -> Iterator[Node]:
        """This node and every node inside it, in pre-order."""
        yield self
        for child in self.children():
            yield from child.walk()

    def _fields(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in type(self).model_fields if name != "span")

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._fields() == other._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._fields()))


class Commented(Node):
    """A node that owns the comment lines written above it and a comment after it."""

    comments: tuple[str, ...] = ()
    note: str | None = None


# ---------------------------------------------------------------- expressions


class Number(Node):
    kind: Literal["number"] = "number"
    value: int | float


class Percent(Node):
    """`8%`: a share of a token set's current size."""

    kind: Literal["percent"] = "percent"
    value: int | float


class String(Node):
    kind: Literal["string"] = "string"
    value: str


class Name(Node):
    """A reference: parameter, token set, score, signal or option value, resolved by the checker."""

    kind: Literal["name"] = "name"
    id: str


class KwArg(Node):
    name: str
    value: Expr


class Call(Node):
    """`fn(args, key=value)`: a signal, function, schedule or set function."""

    kind: Literal["call"] = "call"
    fn: str
    args: tuple[Expr, ...] = ()
    kwargs: tuple[KwArg, ...] = ()


class Flow(Node):
    """`queries -> keys`: which query tokens attend to which key tokens."""

    kind: Literal["flow"] = "flow"
    source: Expr
    target: Expr


class Range(Node):
    """`a..b`: an inclusive range of layers (negative indices count from the end), only as the value of a
    call's keyword argument (`attention(cls -> vision, layers=12..-2)`)."""

    kind: Literal["range"] = "range"
    start: Expr
    stop: Expr


BinaryOp = Literal["+", "-", "*", "/", "|", "&", "<", "<=", ">", ">=", "==", "!=", "and", "or"]


class Binary(Node):
    """Arithmetic on scores and amounts, set algebra (`|`, `&`, `-`), comparisons, logic."""

    kind: Literal["binary"] = "binary"
    op: BinaryOp
    left: Expr
    right: Expr


class Unary(Node):
    kind: Literal["unary"] = "unary"
    op: Literal["-", "not"]
    operand: Expr

    @model_validator(mode="after")
    def _negative_literals_are_literals(self) -> Unary:
        if self.op == "-" and isinstance(self.operand, Number | Percent) and self.operand.value > 0:
            raise ValueError("write a negative literal as Number(value=-x), not Unary('-', x)")
        return self


class Index(Node):
    """`vision[0]`: one image's tokens."""

    kind: Literal["index"] = "index"
    base: Expr
    index: Expr


class ListExpr(Node):
    """`[300, 200, 110]`: one value per layer of a multi-layer stage."""

    kind: Literal["list"] = "list"
    items: tuple[Expr, ...] = Field(min_length=1)


class Select(Node):
    """`top 8% of vision by score`: a token set chosen from `source` by a selector."""

    kind: Literal["select"] = "select"
    selector: str  # a selector operator's name (policyc.catalog.SELECTORS)
    options: tuple[KwArg, ...] = ()
    amount: Expr
    source: Expr
    by: Expr | None = None

    @model_validator(mode="after")
    def _by_matches_selector(self) -> Select:
        from policyc.catalog.selectors import SELECTORS

        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}")
        ranked = SELECTORS.specs[self.selector].by is not None
        if ranked and self.by is None:
            raise ValueError(f"`{self.selector}` needs `by`")
        if not ranked and (self.by is not None or self.options):
            raise ValueError(f"`{self.selector}` takes neither `by` nor options")
        return self


class Where(Node):
    """`vision where condition`: the tokens of `source` for which `condition` holds."""

    kind: Literal["where"] = "where"
    source: Expr
    condition: Expr


Expr = Annotated[
    Number | Percent | String | Name | Call | Flow | Range | Binary | Unary | Index | ListExpr | Select | Where,
    Field(discriminator="kind"),
]

# ---------------------------------------------------------------- statements


class Let(Commented):
    """`let key = <set>`: a named token set, visible in this and every later stage."""

    kind: Literal["let"] = "let"
    name: str
    value: Expr


class ScoreDef(Commented):
    """`score g = <expr>`: a named per-token score."""

    kind: Literal["score"] = "score"
    name: str
    value: Expr


class Keep(Commented):
    """`keep <set>`: keep these tokens of the stage's domain (and protected ones), drop the rest."""

    kind: Literal["keep"] = "keep"
    target: Expr


class Drop(Commented):
    """`drop <set>`: drop these tokens, except protected ones."""

    kind: Literal["drop"] = "drop"
    target: Expr


class Protect(Commented):
    """`protect <set>`: these tokens survive this and every later stage."""

    kind: Literal["protect"] = "protect"
    target: Expr


class Merge(Commented):
    """`merge method(options) of <set> [into <set>] [by <features>]`."""

    kind: Literal["merge"] = "merge"
    method: str
    options: tuple[KwArg, ...] = ()
    source: Expr
    into: Expr | None = None
    by: Expr | None = None


class Positions(Commented):
    """`positions original|compact|cache_length`: position ids of kept tokens."""

    kind: Literal["positions"] = "positions"
    mode: str


class Cache(Commented):
    """`cache method(options)`: the decode-time KV cache policy."""

    kind: Literal["cache"] = "cache"
    method: str
    options: tuple[KwArg, ...] = ()


Statement = Annotated[
    Let | ScoreDef | Keep | Drop | Protect | Merge | Positions | Cache, Field(discriminator="kind")
]

# ---------------------------------------------------------------- stages


class LayerRange(Node):
    """One entry of a layer list: `k`, or `a..b` (inclusive) with an optional `step`."""

    start: Expr
    stop: Expr | None = None
    step: Expr | None = None

    @model_validator(mode="after")
    def _step_needs_stop(self) -> LayerRange:
        if self.step is not None and self.stop is None:
            raise ValueError("a layer step needs a range `a..b`")
        return self


class AllLayers(Node):
    """`[*]`: every layer."""

    kind: Literal["all"] = "all"


class LayerList(Node):
    kind: Literal["list"] = "list"
    items: tuple[LayerRange, ...] = Field(min_length=1)


LayerSelection = Annotated[AllLayers | LayerList, Field(discriminator="kind")]


class Hook(Node):
    """Where a stage runs, e.g. `llm.layer[2, 6]`: `point` "llm.layer" plus a layer selection.

    `layers_after` is how many dotted parts precede the `[...]` (2 for `encoder.layer[0].attention`).
    """

    parts: tuple[str, ...] = Field(min_length=1)
    layers: LayerSelection | None = None
    layers_after: int = 0

    @model_validator(mode="after")
    def _layers_placed_within_parts(self) -> Hook:
        if self.layers is None and self.layers_after != 0:
            raise ValueError("layers_after is 0 when there is no layer selection")
        if self.layers is not None and not 1 <= self.layers_after <= len(self.parts):
            raise ValueError("the layer selection follows one of the hook's parts")
        return self

    @property
    def point(self) -> str:
        return ".".join(self.parts)


class Stage(Commented):
    hook: Hook
    name: str | None = None
    body: tuple[Statement, ...] = ()
    end_comments: tuple[str, ...] = ()


# ---------------------------------------------------------------- policies


class RangeDomain(Node):
    """`in [low, high] [step s] [log]`: a numeric search range."""

    kind: Literal["range"] = "range"
    low: Number | Percent
    high: Number | Percent
    step: Number | Percent | None = None
    log: bool = False


class ChoiceDomain(Node):
    """`in {a, b, c}`: a set of choices."""

    kind: Literal["choice"] = "choice"
    options: tuple[Number | Percent | String | Name, ...] = Field(min_length=1)


Domain = Annotated[RangeDomain | ChoiceDomain, Field(discriminator="kind")]


class Param(Commented):
    """`param name = default [in domain]`: a named value, searchable when it has a domain."""

    name: str
    default: Number | Percent | String | Name
    domain: Domain | None = None


class Meta(Commented):
    """`title|paper|description "text"`."""

    key: Literal["title", "paper", "description"]
    value: str


class Use(Commented):
    """`use other[.stage](param=value)`: include another policy's stages (or one of them)."""

    policy: str
    stage: str | None = None
    overrides: tuple[KwArg, ...] = ()


class Policy(Commented):
    name: str
    meta: tuple[Meta, ...] = ()
    params: tuple[Param, ...] = ()
    uses: tuple[Use, ...] = ()
    stages: tuple[Stage, ...] = ()
    end_comments: tuple[str, ...] = ()

    def meta_value(self, key: str) -> str | None:
        return next((m.value for m in self.meta if m.key == key), None)


class Import(Commented):
    """`import "path.tokpol" [as alias]`: policies of another file become usable."""

    path: str
    alias: str | None = None


# ---------------------------------------------------------------- searches


class Choose(Commented):
    """`choose { fastv, lib.visionzip }`: the candidate policies of a search, named as `use` names them."""

    policies: tuple[Name, ...] = Field(min_length=1)  # `Name(id="lib.visionzip")` for a dotted name


class SearchParam(Commented):
    """`fastv.ratio in [5%, 50%]` narrows (or gives) a parameter's domain; `fastv.rows = last` fixes it.

    `target` is the dotted name as written: a candidate as chosen (`fastv`, `lib.fastv`), then the
    parameter's qualified name (`ratio`, or `pyramiddrop.ratio` for a policy the candidate uses).
    Exactly one of `domain` and `value` is set.
    """

    target: tuple[str, ...] = Field(min_length=2)
    domain: Domain | None = None
    value: Number | Percent | String | Name | None = None

    @model_validator(mode="after")
    def _narrows_or_fixes(self) -> SearchParam:
        if (self.domain is None) == (self.value is None):
            raise ValueError("a search parameter has either a domain or a fixed value")
        return self

    @property
    def dotted(self) -> str:
        return ".".join(self.target)


class Search(Commented):
    """`search name { choose {...} ... }`: a space of policies and parameter values to search over.

    `choose` is None only for a search written without one (the checker reports it).
    """

    name: str
    meta: tuple[Meta, ...] = ()
    choose: Choose | None = None
    params: tuple[SearchParam, ...] = ()
    end_comments: tuple[str, ...] = ()

    def meta_value(self, key: str) -> str | None:
        return next((m.value for m in self.meta if m.key == key), None)


class PolicyFile(Node):
    """A parsed `.tokpol` file."""

    format_version: Literal[1] = FORMAT_VERSION
    imports: tuple[Import, ...] = ()
    policies: tuple[Policy, ...] = ()
    searches: tuple[Search, ...] = ()
    end_comments: tuple[str, ...] = ()
