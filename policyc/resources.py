"""Files shipped inside the package: the grammar and the standard library of policies."""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable


def grammar_text() -> str:
    return resources.files("policyc.grammar").joinpath("tokpol.lark").read_text(encoding="utf-8")


def stdlib_files() -> dict[str, Traversable]:
    """Standard-library policy files by stem, e.g. {"fastv": <.../fastv.tokpol>}."""
    folder = resources.files("policyc.policies")
    return {f.name.removesuffix(".tokpol"): f for f in sorted(folder.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".tokpol")}
