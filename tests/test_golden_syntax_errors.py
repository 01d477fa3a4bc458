"""Golden tests for syntax diagnostics: each tests/golden/errors/syntax/*.tokpol fails with the text in `.err`."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import check_golden

from policyc.errors import PolicyError
from policyc.lang.build import parse

GOLDEN_DIR = Path(__file__).parent / "golden" / "errors" / "syntax"
INPUTS = sorted(GOLDEN_DIR.glob("*.tokpol"))


def test_there_are_golden_inputs() -> None:
    """Guard against a glob that silently matches nothing."""
    assert len(INPUTS) >= 15


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_syntax_error(source: Path, update_goldens: bool) -> None:
    """`parse` raises a `PolicyError` whose rendering matches `<name>.err`."""
    with pytest.raises(PolicyError) as caught:
        parse(source.read_text(encoding="utf-8"), source.name)
    rendered = str(caught.value)
    assert rendered.startswith(f"{source.name}:"), "a syntax error must point at a location in the file"
    check_golden(source.with_suffix(".err"), rendered + "\n", update_goldens)
