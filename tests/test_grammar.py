"""The shipped grammar is conflict-free LALR(1), and the cached parser builds from nothing."""

from __future__ import annotations

from pathlib import Path

import interegular  # noqa: F401  -- strict mode needs it; a missing dev dependency must fail here
import pytest
from lark import Lark, Tree

from policyc.lang import parser as parser_module
from policyc.resources import grammar_text

SAMPLE = """
import "fastv.tokpol" as f
policy p {
  title "P"
  param k = 2 in [1, 8] step 1
  use f.fastv(k=3)
  stage llm.layer[k, 10..20 step 2] as s {
    let a = vision where norm(keys) > 0.5
    keep top 50% of a by attention(last -> vision)
    merge bipartite(r=8) of vision into a by keys
    positions compact
  }
  stage decode { cache heavy_hitter(heavy=10%, recent=10%) }
}
"""


def test_grammar_is_strict_lalr_without_conflicts() -> None:
    """`strict=True` turns shift/reduce conflicts and colliding terminals into errors, so building proves none."""
    strict = Lark(grammar_text(), parser="lalr", strict=True, propagate_positions=True, maybe_placeholders=True)
    tree = strict.parse(SAMPLE)
    assert isinstance(tree, Tree)
    assert tree.data == "start"


def test_grammar_loads_from_package_data() -> None:
    """The grammar comes from policyc.grammar (the repository's grammar/ folder), not a stray copy."""
    assert "policy" in grammar_text()
    repo_grammar = Path(__file__).resolve().parents[1] / "grammar" / "tokpol.lark"
    if repo_grammar.exists():  # running from a checkout: the packaged file must be that file's content
        assert grammar_text() == repo_grammar.read_text(encoding="utf-8")


def test_lark_parser_with_empty_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fresh cache directory, `lark_parser()` builds the tables, writes the cache, and reloads from it."""
    cache_dir = tmp_path / "cache" / "nested"
    monkeypatch.setenv("POLICYC_CACHE_DIR", str(cache_dir))
    parser_module.lark_parser.cache_clear()
    try:
        built = parser_module.lark_parser()
        assert built.options.parser == "lalr"
        expected = built.parse(SAMPLE)
        assert list(cache_dir.glob("tokpol-*.lark-cache")), "the analysed tables were not cached on disk"

        parser_module.lark_parser.cache_clear()
        reloaded = parser_module.lark_parser()
        assert reloaded is not built
        assert reloaded.parse(SAMPLE) == expected
    finally:
        parser_module.lark_parser.cache_clear()


def test_lark_parser_with_unwritable_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache directory that cannot be created (its parent is a file) does not stop parsing."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("", encoding="utf-8")
    monkeypatch.setenv("POLICYC_CACHE_DIR", str(blocker / "cache"))
    parser_module.lark_parser.cache_clear()
    try:
        assert parser_module.lark_parser().parse(SAMPLE).data == "start"
    finally:
        parser_module.lark_parser.cache_clear()
