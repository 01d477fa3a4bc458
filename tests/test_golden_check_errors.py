"""Golden tests for semantic diagnostics: each tests/golden/errors/check/*.tokpol parses but fails
the checker with exactly the text in its `.err` file (location, source line, caret, hint)."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import check_golden

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.lang.build import parse

GOLDEN_DIR = Path(__file__).parent / "golden" / "errors" / "check"
INPUTS = sorted(GOLDEN_DIR.glob("*.tokpol"))


def test_there_are_golden_inputs() -> None:
    assert len(INPUTS) >= 30


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_check_error(source: Path, update_goldens: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN_DIR)  # imports resolve relative to the file's folder
    text = source.read_text(encoding="utf-8")
    parse(text, source.name)  # these inputs are syntactically valid: the checker must catch them
    with pytest.raises(PolicyError) as caught:
        check_source(text, source.name)
    rendered = str(caught.value)
    for diagnostic in caught.value.diagnostics:
        assert diagnostic.span is not None and diagnostic.span.file == source.name, rendered
    check_golden(source.with_suffix(".err"), rendered + "\n", update_goldens)
