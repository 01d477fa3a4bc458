"""Golden tests for the front end: each tests/golden/parse/*.tokpol has its IR and canonical print on file."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import check_golden

from policyc.lang.build import parse
from policyc.lang.printer import print_file

GOLDEN_DIR = Path(__file__).parent / "golden" / "parse"
INPUTS = sorted(p for p in GOLDEN_DIR.glob("*.tokpol") if not p.name.endswith(".fmt.tokpol"))


def test_there_are_golden_inputs() -> None:
    """Guard against a glob that silently matches nothing."""
    assert len(INPUTS) >= 8


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_parse_ir(source: Path, update_goldens: bool) -> None:
    """The IR (spans excluded) serialised as JSON matches `<name>.ir.json`."""
    parsed = parse(source.read_text(encoding="utf-8"), source.name)
    check_golden(source.with_name(f"{source.stem}.ir.json"), parsed.model_dump_json(indent=2) + "\n", update_goldens)


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_canonical_print(source: Path, update_goldens: bool) -> None:
    """The canonical print matches `<name>.fmt.tokpol`, reparses to the same IR, and is a fixed point."""
    parsed = parse(source.read_text(encoding="utf-8"), source.name)
    printed = print_file(parsed)
    check_golden(source.with_name(f"{source.stem}.fmt.tokpol"), printed, update_goldens)
    reparsed = parse(printed, f"{source.stem}.fmt.tokpol")
    assert reparsed == parsed
    assert print_file(reparsed) == printed
