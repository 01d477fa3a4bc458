"""Golden-file comparison: expected outputs live next to their inputs under tests/golden/."""

from __future__ import annotations

import difflib
from pathlib import Path

import pytest


def check_golden(path: Path, actual: str, update: bool) -> None:
    """Compare `actual` with the text stored at `path`; with `update`, (re)write the file instead.

    A missing golden file fails unless updating. A mismatch fails with a unified diff.
    """
    if update:
        if not path.exists() or path.read_text(encoding="utf-8") != actual:
            path.write_text(actual, encoding="utf-8")
        return
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; run pytest with --update-goldens to create it", pytrace=False)
    expected = path.read_text(encoding="utf-8")
    if expected != actual:
        diff = "".join(
            difflib.unified_diff(
                expected.splitlines(keepends=True),
                actual.splitlines(keepends=True),
                fromfile=f"{path} (expected)",
                tofile=f"{path} (actual)",
            )
        )
        pytest.fail(
            f"output differs from golden file {path} (run pytest with --update-goldens to accept):\n{diff}",
            pytrace=False,
        )
