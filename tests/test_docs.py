"""The documentation site: every page the navigation names exists, and the generated pages (policyc/docsite.py)
follow the policy files, the methods table and the registries they are built from."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from policyc.catalog import REGISTRIES
from policyc.docsite import MethodRow, catalog_page, methods_rows, policy_page, site_pages
from policyc.lang import check_stdlib
from policyc.lang.graph import build_graph
from policyc.show import catalog_markdown

ROOT = Path(__file__).parent.parent
DOCS = ROOT / "docs"
POLICIES = sorted(p.stem for p in (ROOT / "policies").glob("*.tokpol"))


def _nav_pages() -> list[str]:
    """The pages mkdocs.yml's nav names, and those of the Methods section (methods/, its generated SUMMARY.md)."""
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8").split("\nnav:\n", 1)[1]
    assert re.search(r"^  - Methods: methods/$", nav, re.MULTILINE)
    methods = re.findall(r"\]\((\w+\.md)\)", site_pages(ROOT)["methods/SUMMARY.md"])
    return re.findall(r"([\w/.-]+\.md)\s*$", nav, re.MULTILINE) + [f"methods/{page}" for page in methods]


def test_every_page_of_the_navigation_exists_or_is_generated() -> None:
    generated = site_pages(ROOT)
    pages = _nav_pages()
    assert len(pages) >= 20
    missing = [p for p in pages if not (DOCS / p).is_file() and p not in generated]
    assert not missing, f"mkdocs.yml names pages that do not exist: {missing}"


@pytest.mark.parametrize("page", [
    "index.md", "getting-started/install.md", "getting-started/first-policy.md", "getting-started/first-eval.md",
    "getting-started/first-search.md", "tutorial.md", "howto/compile.md", "howto/serve.md", "howto/evaluate.md",
    "howto/search.md", "howto/benchmark.md", "howto/artifacts.md", "howto/multi-image.md", "reference/language.md",
    "reference/catalog.md", "methods/index.md", "families.md", "robustness.md", "figures.md", "architecture.md",
    "contributing.md",
])
def test_the_pages_the_site_promises_are_in_its_navigation(page: str) -> None:
    assert page in _nav_pages()


def test_every_standard_library_policy_gets_a_generated_page() -> None:
    generated = site_pages(ROOT)
    pages = [p.removeprefix("methods/").removesuffix(".md") for p in generated if p.startswith("methods/")]
    assert sorted(pages) == sorted([*POLICIES, "SUMMARY"])
    assert generated["methods/SUMMARY.md"].startswith("- [The standard library](index.md)\n- [FastV](fastv.md)\n")
    rows = {row.policy: row for row in methods_rows((DOCS / "methods" / "index.md").read_text(encoding="utf-8"))}
    for name in POLICIES:
        page = generated[f"methods/{name}.md"]
        assert page.startswith(f"# {rows[name].method}\n")
        assert f"**{rows[name].status}**" in page and (ROOT / "policies" / f"{name}.tokpol").read_text() in page


def test_fastv_page_says_what_the_policy_file_and_the_methods_table_say() -> None:
    page = site_pages(ROOT)["methods/fastv.md"]
    assert "paper: [arXiv:2403.06764](https://arxiv.org/abs/2403.06764)" in page
    assert "| `ratio` | `50%` | `[5%, 90%]` |" in page and "| `rows` | `last` | `{last, all}` |" in page
    assert "- `llm.layer[layer] as prune`" in page
    assert "    keep top ratio of vision by attention(rows -> vision)" in page
    assert "**proven**: `tests/test_fastv_reference.py`" in page
    assert "Deviations and notes: code variant (last query row) by default" in page
    assert "```mermaid\nflowchart TD\n" in page
    assert "[`top(allocate=none)`](../reference/catalog.md#selectors) | selector | policyc |" in page


def _copy_sources(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "policies", tmp_path / "policies")
    (tmp_path / "docs" / "methods").mkdir(parents=True)
    shutil.copy(DOCS / "methods" / "index.md", tmp_path / "docs" / "methods" / "index.md")
    return tmp_path


def test_a_changed_policy_file_changes_its_generated_page(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path)
    before = site_pages(root)
    fastv = root / "policies" / "fastv.tokpol"
    fastv.write_text(fastv.read_text().replace("param ratio = 50% in [5%, 90%]", "param ratio = 30% in [10%, 60%]")
                     .replace('description "After LLM layer K-1', 'description "Changed: after LLM layer K-1'))
    after = site_pages(root)
    assert after["methods/fastv.md"] != before["methods/fastv.md"]
    assert "| `ratio` | `30%` | `[10%, 60%]` |" in after["methods/fastv.md"]
    assert "> Changed: after LLM layer K-1" in after["methods/fastv.md"]
    assert "| `ratio` | `50%` | `[5%, 90%]` |" not in after["methods/fastv.md"]
    assert {k: v for k, v in after.items() if k != "methods/fastv.md"} == \
        {k: v for k, v in before.items() if k != "methods/fastv.md"}


def test_a_new_policy_file_gets_a_page_and_a_changed_row_changes_it(tmp_path: Path) -> None:
    root = _copy_sources(tmp_path)
    (root / "policies" / "half.tokpol").write_text(
        'policy half {\n  paper "arXiv:2403.06764"\n  stage llm.layer[1] {\n'
        "    keep top 50% of vision by key_norm\n  }\n}\n")
    page = site_pages(root)["methods/half.md"]
    assert page.startswith("# half\n") and "Not in the methods table" in page and "key_norm(layer=here)" in page
    assert site_pages(root)["methods/SUMMARY.md"].endswith("- [half](half.md)\n")  # no row yet: after the table's
    index = root / "docs" / "methods" / "index.md"
    index.write_text(index.read_text().replace(
        "<!-- methods:end -->", "| Half | arXiv:2403.06764 | llm | [`half.tokpol`](half.md) | runs: a test | "
        "keeps half |\n<!-- methods:end -->"))
    assert site_pages(root)["methods/SUMMARY.md"].endswith("- [Half](half.md)\n")
    page = site_pages(root)["methods/half.md"]
    assert page.startswith("# Half\n") and "**runs**: a test" in page and "Deviations and notes: keeps half" in page


def test_methods_rows_read_every_column_and_refuse_a_broken_row() -> None:
    rows = methods_rows((DOCS / "methods" / "index.md").read_text(encoding="utf-8"))
    notes = "code variant (last query row) by default; the paper's mean over all rows is `rows=all`"
    assert rows[0] == MethodRow("FastV", "arXiv:2403.06764", "llm", "fastv", "proven",
                                "`tests/test_fastv_reference.py`", notes)
    assert {row.status for row in rows} <= {"proven", "runs", "not yet"}
    with pytest.raises(ValueError, match="needs 6 cells"):
        methods_rows("<!-- methods:start -->\n| a | b |\n|---|---|\n| x | y |\n<!-- methods:end -->")
    with pytest.raises(ValueError, match="no methods table"):
        methods_rows("no table here")


def test_catalog_page_is_the_registries() -> None:
    page = catalog_page()
    assert page == site_pages(ROOT)["reference/catalog.md"]
    for registry in REGISTRIES:
        assert f"\n## {registry.title}\n" in page
    tables = re.sub(r"^\*\*(\w+)\*\*$", r"## \1", catalog_markdown(), flags=re.MULTILINE)
    assert tables.rstrip("\n") in page


def test_policy_page_reads_the_file_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "two.tokpol"
    path.write_text("# Two stages.\npolicy two {\n  stage encoder.layer[-2] {\n    keep top 50% of vision by "
                    "random\n  }\n  stage decode {\n    cache heavy_hitter\n  }\n}\n")
    page = policy_page(path, [])
    assert "stages: encoder + decode" in page and "Two stages." in page
    assert "| heavy_hitter(heavy=10%, recent=10%, per_head=true)" not in page  # inside a link cell
    assert "[`heavy_hitter(heavy=10%, recent=10%, per_head=true)`](../reference/catalog.md#caches)" in page


def test_header_comments_keep_their_lists() -> None:
    page = site_pages(ROOT)["methods/mustdrop.md"]
    assert "MustDrop, as its code does it, over the whole lifecycle:\n\n- encoder layer 0: merge each 3x3 window of " \
        "patches whose mean pairwise cosine similarity is at least 0.8 into one token;\n- encoder layer 23" in page
    assert "the last stage.\n\nOrder: the window merge" in page


def test_architecture_page_draws_the_stage_graph_policyc_show_draws() -> None:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    drawn = text.split("```mermaid\n", 1)[1].split("```", 1)[0]
    assert drawn == build_graph(check_stdlib()["mustdrop"]).to_mermaid(), \
        "paste `policyc show mustdrop --graph mermaid` into docs/architecture.md"
