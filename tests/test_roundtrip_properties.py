"""Property tests: the canonical printer and the parser are inverse on every valid IR.

For random valid IR `f` (tests/strategies.py): `parse(print_file(f)) == f`, and printing is a fixed
point, `print_file(parse(print_file(f))) == print_file(f)`. Every `.tokpol` file shipped under
policies/, and the hand-written tests/data/everything.tokpol, round-trips the same way.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from strategies import KEYWORDS, example_count, expressions, grammar_keywords, policy_files

from policyc.lang import ir
from policyc.lang.build import parse
from policyc.lang.printer import print_expr, print_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).parent / "data" / "everything.tokpol"
SHIPPED = sorted([*(ROOT / "policies").glob("**/*.tokpol"), *(ROOT / "examples").glob("**/*.tokpol")])
ROUND_TRIP_FILES = [*SHIPPED, SAMPLE]

PROPERTY_SETTINGS = settings(
    max_examples=example_count(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _in_stage(expr: ir.Expr) -> ir.PolicyFile:
    """`expr` as the only statement of a stage, so that it can be printed and parsed."""
    stage = ir.Stage(hook=ir.Hook(parts=("llm", "layer")), body=(ir.Keep(target=expr),))
    return ir.PolicyFile(policies=(ir.Policy(name="p", stages=(stage,)),))


def test_keywords_match_grammar() -> None:
    """The strategies' keyword list is exactly the grammar's identifier-like literals."""
    assert grammar_keywords() == KEYWORDS


@PROPERTY_SETTINGS
@given(policy_files)
@example(ir.PolicyFile())
@example(ir.PolicyFile(end_comments=("", " only a comment")))
def test_print_then_parse_is_identity_and_printing_is_idempotent(file: ir.PolicyFile) -> None:
    """Parsing the canonical print gives back the same IR (spans aside), and printing that IR again gives
    the same text. (IR equality does not tell `1` from `1.0`; the second check does.) One test for both
    properties, because generating whole files is what costs time."""
    text = print_file(file)
    reparsed = parse(text, "printed.tokpol")
    assert reparsed == file, text
    assert print_file(reparsed) == text


@PROPERTY_SETTINGS
@given(expressions)
@example(ir.Number(value=-0.0))
@example(ir.Percent(value=1e-05))
@example(ir.Percent(value=1e16))
@example(ir.Percent(value=-1e-07))
@example(ir.Unary(op="-", operand=ir.Number(value=-3)))
@example(ir.Unary(op="-", operand=ir.Number(value=0.0)))
@example(ir.Index(base=ir.Number(value=-1), index=ir.Number(value=0)))
def test_expression_round_trip(expr: ir.Expr) -> None:
    """Expressions alone (more of them per run than whole files): print, parse, compare."""
    file = _in_stage(expr)
    text = print_file(file)
    reparsed = parse(text, "expr.tokpol")
    assert reparsed == file, text
    statement = reparsed.policies[0].stages[0].body[0]
    assert isinstance(statement, ir.Keep)
    assert print_expr(statement.target) == print_expr(expr)


def test_there_is_something_to_round_trip() -> None:
    """The sample is always there, whatever policies/ holds."""
    assert SAMPLE in ROUND_TRIP_FILES
    assert SAMPLE.exists()


@pytest.mark.parametrize("path", ROUND_TRIP_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_policy_file_round_trips(path: Path) -> None:
    """A hand-written file parses; its canonical print reparses to the same IR and is a fixed point."""
    parsed = parse(path.read_text(encoding="utf-8"), path.name)
    printed = print_file(parsed)
    reparsed = parse(printed, path.name)
    assert reparsed == parsed
    assert print_file(reparsed) == printed


def test_sample_uses_every_construct() -> None:
    """tests/data/everything.tokpol really exercises every IR node kind, selector, operator and statement."""
    parsed = parse(SAMPLE.read_text(encoding="utf-8"), SAMPLE.name)
    seen: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, ir.Node):
            seen.add(type(value).__name__)
            for field in type(value).model_fields:
                walk(getattr(value, field))
            if isinstance(value, ir.Select):
                seen.add(f"select:{value.selector}")
            if isinstance(value, ir.Binary | ir.Unary):
                seen.add(f"op:{value.op}")
            if isinstance(value, ir.Commented) and value.note is not None:
                seen.add("note")
        elif isinstance(value, tuple):
            for item in value:
                walk(item)

    walk(parsed)
    node_kinds = {
        "Number", "Percent", "String", "Name", "KwArg", "Call", "Flow", "Binary", "Unary", "Index", "ListExpr",
        "Select", "Where", "Let", "ScoreDef", "Keep", "Drop", "Protect", "Merge", "Positions", "Cache",
        "LayerRange", "AllLayers", "LayerList", "Hook", "Stage", "RangeDomain", "ChoiceDomain", "Param", "Meta",
        "Use", "Policy", "Import", "PolicyFile",
    }
    selectors = {f"select:{s}" for s in ("top", "diverse", "cover", "facility", "grid", "stride")}
    # `<`, `<=`, `>=`, `!=`, `==`, `>`... every operator the IR has, and both unary operators.
    operators = {f"op:{o}" for o in ("+", "-", "*", "/", "|", "&", "<", "<=", ">", ">=", "==", "!=", "and", "or",
                                     "not")}
    missing = (node_kinds | selectors | operators | {"note"}) - seen
    assert not missing, f"everything.tokpol does not use: {sorted(missing)}"
