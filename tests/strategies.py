"""Hypothesis strategies that build random, valid `.tokpol` IR directly (no text involved).

"Valid" means: IR that the grammar can express and that `parse` would build, i.e. exactly the IR for
which `parse(print_file(f)) == f` must hold. The constraints this encodes (see grammar/tokpol.lark):

- names are identifiers and never a keyword of the grammar (`KEYWORDS`);
- `Flow` (`a -> b`) only as a call argument or a call's keyword-argument value, never nested in a flow,
  never as an option of `merge`/`cache`/a selector or a `use` override (those take plain `expr`);
- `Range` (`a..b`) only as the value of a call's keyword argument;
- `grid`/`stride` selections have no `by` and no options; `top`/`diverse`/`cover`/`sample` need `by`;
- `Unary('-', <positive number or percent>)` does not exist: the builder folds `-5` into `Number(-5)`;
- lists, choice domains, hook parts and layer lists are non-empty; a layer `step` needs a `stop`;
- parameter literals (defaults, domain bounds, choices) cannot be negative percentages (`-5%` is not a
  `literal` in the grammar) and range bounds/steps are numbers or percentages;
- `Hook.layers_after` is in 1..len(parts) when there is a layer selection, else 0;
- `Policy.meta` is in canonical order (title, paper, description), as the builder stores it; a `Search`
  has `title` and `description` only, and a search parameter's target has at least two parts;
- comment text contains no newline and is right-stripped (it is what follows '#', right-stripped).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hypothesis import strategies as st

from policyc.lang import ir

# Every identifier-like string literal of grammar/tokpol.lark. `test_keywords_match_grammar` keeps this
# list honest when the grammar changes.
KEYWORDS: frozenset[str] = frozenset({
    "and", "as", "by", "cache", "choose", "cover", "description", "diverse", "drop", "grid",
    "import", "in", "into", "keep", "let", "log", "merge", "not", "of", "or", "paper", "param", "policy", "positions",
    "protect", "score", "search", "stage", "step", "stride", "title", "top", "use", "where",
})

GRAMMAR_PATH = Path(__file__).resolve().parents[1] / "grammar" / "tokpol.lark"


def grammar_keywords() -> frozenset[str]:
    """The identifier-like string literals of the grammar file."""
    return frozenset(re.findall(r'"([A-Za-z_][A-Za-z0-9_]*)"', GRAMMAR_PATH.read_text(encoding="utf-8")))


def example_count(default: int = 300) -> int:
    """Examples per property: `POLICYC_HYPOTHESIS_EXAMPLES` (CI sets 2000), else `default`."""
    return int(os.environ.get("POLICYC_HYPOTHESIS_EXAMPLES", default))


# ---------------------------------------------------------------- leaves

# Names close to keywords, one-character names and underscores find lexer mistakes quickly.
_NAME_POOL = ["vision", "text", "keys", "cls", "last", "k", "x", "_", "a1", "__b", "topk", "Top", "notx",
              "in_", "policy2", "bye", "o", "e", "E", "e5", "inf", "nan", "attention", "sum", "mean"]

names: st.SearchStrategy[str] = st.one_of(
    st.sampled_from(_NAME_POOL),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True),
).filter(lambda n: n not in KEYWORDS and n not in _RANKED)

# A mix of ordinary values and ones whose repr uses an exponent (1e-05, 1e+16) or is extreme.
_SPECIAL_FLOATS = [0.0, -0.0, 0.5, 1e-05, 1e-4, 1e16, 1.5e300, 5e-324, 1.7976931348623157e308, 0.1 + 0.2, 123.0]
_floats = st.one_of(st.sampled_from(_SPECIAL_FLOATS), st.floats(allow_nan=False, allow_infinity=False))
_ints = st.one_of(st.integers(min_value=-10, max_value=300), st.integers(min_value=-(10**30), max_value=10**30))
numeric_values: st.SearchStrategy[int | float] = st.one_of(
    _ints, _floats, st.sampled_from([-x for x in _SPECIAL_FLOATS])
)
non_negative_values: st.SearchStrategy[int | float] = numeric_values.filter(lambda v: v >= 0)

numbers = st.builds(ir.Number, value=numeric_values)
percents = st.builds(ir.Percent, value=numeric_values)

# Quotes, backslashes, newlines, tabs, '#' (comment start inside a string), braces, any other character.
_string_chars = st.one_of(
    st.sampled_from(list('"\\\n\t#{}()-> %ab')),
    st.characters(codec="utf-8"),
)
string_values: st.SearchStrategy[str] = st.text(_string_chars, max_size=12)
strings = st.builds(ir.String, value=string_values)
name_refs = st.builds(ir.Name, id=names)

# Comment text: everything after '#' on its line, right-stripped; so no newline, no trailing space.
comment_texts: st.SearchStrategy[str] = st.text(
    st.one_of(st.sampled_from(list(' #"\\{}\t')), st.characters(codec="utf-8", exclude_characters="\n")),
    max_size=16,
).map(str.rstrip)
comment_lines = st.lists(comment_texts, max_size=2).map(tuple)
notes = st.none() | comment_texts


# ---------------------------------------------------------------- expressions

_leaf: st.SearchStrategy[ir.Expr] = st.one_of(numbers, percents, strings, name_refs)

_BINARY_OPS = ["+", "-", "*", "/", "|", "&", "<", "<=", ">", ">=", "==", "!=", "and", "or"]
_RANKED = ["top", "diverse", "cover", "sample", "focal", "facility"]
_UNRANKED = ["grid", "stride"]


def _kwargs(values: st.SearchStrategy[ir.Expr], max_size: int = 2) -> st.SearchStrategy[tuple[ir.KwArg, ...]]:
    return st.lists(st.builds(ir.KwArg, name=names, value=values), max_size=max_size).map(tuple)


def _negate(expr: ir.Expr) -> ir.Expr:
    """`-expr` as the builder would build it: `Unary('-', expr)`, except that `-<positive literal>` is folded."""
    if isinstance(expr, ir.Number | ir.Percent) and expr.value > 0:
        return type(expr)(value=-expr.value)
    return ir.Unary(op="-", operand=expr)


def _extend(children: st.SearchStrategy[ir.Expr]) -> st.SearchStrategy[ir.Expr]:
    """One level of composite expressions over `children` (which never contain a bare `Flow`)."""
    flows = st.builds(ir.Flow, source=children, target=children)
    ranges = st.builds(ir.Range, start=children, stop=children)  # `a..b`: only as a keyword argument's value
    call_arg = st.one_of(children, flows)
    calls = st.builds(
        ir.Call,
        fn=names,
        args=st.lists(call_arg, max_size=3).map(tuple),
        kwargs=_kwargs(st.one_of(call_arg, ranges)),
    )
    ranked = st.builds(
        ir.Select,
        selector=st.sampled_from(_RANKED),
        options=_kwargs(children),
        amount=children,
        source=children,
        by=children,
    )
    unranked = st.builds(ir.Select, selector=st.sampled_from(_UNRANKED), amount=children, source=children)
    return st.one_of(
        calls,
        st.builds(ir.Binary, op=st.sampled_from(_BINARY_OPS), left=children, right=children),
        st.builds(ir.Unary, op=st.just("not"), operand=children),
        children.map(_negate),
        st.builds(ir.Index, base=children, index=children),
        st.lists(children, min_size=1, max_size=3).map(lambda items: ir.ListExpr(items=tuple(items))),
        ranked,
        unranked,
        st.builds(ir.Where, source=children, condition=children),
    )


expressions: st.SearchStrategy[ir.Expr] = st.recursive(_leaf, _extend, max_leaves=10)
"""Any expression except a bare `Flow` (flows appear only inside calls)."""


# ---------------------------------------------------------------- statements

options = _kwargs(expressions)


def _commented(model: type[ir.Commented], **fields: st.SearchStrategy[object]) -> st.SearchStrategy[ir.Commented]:
    return st.builds(model, comments=comment_lines, note=notes, **fields)


statements: st.SearchStrategy[ir.Statement] = st.one_of(
    _commented(ir.Let, name=names, value=expressions),
    _commented(ir.ScoreDef, name=names, value=expressions),
    _commented(ir.Keep, target=expressions),
    _commented(ir.Drop, target=expressions),
    _commented(ir.Protect, target=expressions),
    _commented(
        ir.Merge,
        method=names,
        options=options,
        source=expressions,
        into=st.none() | expressions,
        by=st.none() | expressions,
    ),
    _commented(ir.Positions, mode=names),
    _commented(ir.Cache, method=names, options=options),
)  # type: ignore[assignment]


# ---------------------------------------------------------------- stages


@st.composite
def layer_ranges(draw: st.DrawFn) -> ir.LayerRange:
    """`k`, `a..b` or `a..b step s`."""
    start = draw(expressions)
    stop = draw(st.none() | expressions)
    step = draw(st.none() | expressions) if stop is not None else None
    return ir.LayerRange(start=start, stop=stop, step=step)


@st.composite
def hooks(draw: st.DrawFn) -> ir.Hook:
    """`decode`, `llm.layer[2, 6..14 step 4]`, `encoder.layer[*].attention`, `a[0]`."""
    parts = tuple(draw(st.lists(names, min_size=1, max_size=3)))
    layers = draw(st.one_of(
        st.none(),
        st.just(ir.AllLayers()),
        st.lists(layer_ranges(), min_size=1, max_size=3).map(lambda items: ir.LayerList(items=tuple(items))),
    ))
    after = draw(st.integers(min_value=1, max_value=len(parts))) if layers is not None else 0
    return ir.Hook(parts=parts, layers=layers, layers_after=after)


stages: st.SearchStrategy[ir.Stage] = _commented(
    ir.Stage,
    hook=hooks(),
    name=st.none() | names,
    body=st.lists(statements, max_size=4).map(tuple),
    end_comments=comment_lines,
)  # type: ignore[assignment]


# ---------------------------------------------------------------- policies and files

_bounds = st.one_of(
    st.builds(ir.Number, value=numeric_values),
    st.builds(ir.Percent, value=non_negative_values),
)
literals: st.SearchStrategy[ir.Number | ir.Percent | ir.String | ir.Name] = st.one_of(_bounds, strings, name_refs)
domains = st.one_of(
    st.none(),
    st.builds(ir.RangeDomain, low=_bounds, high=_bounds, step=st.none() | _bounds, log=st.booleans()),
    st.lists(literals, min_size=1, max_size=4).map(lambda o: ir.ChoiceDomain(options=tuple(o))),
)
params = _commented(ir.Param, name=names, default=literals, domain=domains)
metas = _commented(ir.Meta, key=st.sampled_from(["title", "paper", "description"]), value=string_values)
uses = _commented(ir.Use, policy=names, stage=st.none() | names, overrides=options)

_META_ORDER = ("title", "paper", "description")

policies: st.SearchStrategy[ir.Policy] = _commented(
    ir.Policy,
    name=names,
    meta=st.lists(metas, max_size=3).map(
        lambda ms: tuple(sorted(ms, key=lambda m: _META_ORDER.index(m.key)))  # type: ignore[attr-defined]
    ),
    params=st.lists(params, max_size=3).map(tuple),
    uses=st.lists(uses, max_size=2).map(tuple),
    stages=st.lists(stages, max_size=3).map(tuple),
    end_comments=comment_lines,
)  # type: ignore[assignment]

imports = _commented(ir.Import, path=string_values, alias=st.none() | names)

# Searches: a dotted candidate (`fastv`, `lib.fastv`) and parameter; `title`/`description` only; parameter
# literals as for `param` (no negative percentages); exactly one of a domain and a fixed value.
_dotted = st.lists(names, min_size=1, max_size=2).map(lambda parts: ir.Name(id=".".join(parts)))
_search_targets = st.lists(names, min_size=2, max_size=3).map(tuple)
search_params = st.one_of(
    _commented(ir.SearchParam, target=_search_targets, domain=domains.filter(lambda d: d is not None)),
    _commented(ir.SearchParam, target=_search_targets, value=literals),
)
search_metas = _commented(ir.Meta, key=st.sampled_from(["title", "description"]), value=string_values)
searches: st.SearchStrategy[ir.Search] = _commented(
    ir.Search,
    name=names,
    meta=st.lists(search_metas, max_size=2).map(
        lambda ms: tuple(sorted(ms, key=lambda m: _META_ORDER.index(m.key)))  # type: ignore[attr-defined]
    ),
    choose=st.none() | _commented(ir.Choose, policies=st.lists(_dotted, min_size=1, max_size=3).map(tuple)),
    params=st.lists(search_params, max_size=3).map(tuple),
    end_comments=comment_lines,
)  # type: ignore[assignment]

policy_files: st.SearchStrategy[ir.PolicyFile] = st.builds(
    ir.PolicyFile,
    imports=st.lists(imports, max_size=2).map(tuple),
    policies=st.lists(policies, max_size=2).map(tuple),
    searches=st.lists(searches, max_size=2).map(tuple),
    end_comments=comment_lines,
)
"""Whole files: imports, policies, searches, comments everywhere comments can be."""
