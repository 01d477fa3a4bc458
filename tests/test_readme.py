"""The README stays true: its commands are CI's commands, its links lead somewhere, its methods table is the
documentation's."""

from __future__ import annotations

import re
from pathlib import Path

from policyc.docsite import methods_rows, readme_methods_table, update_readme

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _ci_command(name: str) -> str:
    match = re.search(rf'^{name}="(.*)"$', (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    assert match, f"{name} missing from .ci/run"
    return match.group(1)


def test_readme_starts_with_the_two_ci_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.DOTALL)
    assert blocks[:2] == [_ci_command("SETUP_COMMAND"), _ci_command("TEST_COMMAND")]
    assert README.index(blocks[0]) < README.index("## A 20-line tour")


def test_readme_stays_short() -> None:
    assert len(README.splitlines()) <= 200


def test_readme_links_lead_to_files_of_the_repository() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    local = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert "docs/getting-started/install.md" in local and "docs/methods/index.md" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_methods_table_is_generated_from_the_documentation() -> None:
    embedded = README.split("<!-- readme-methods:start -->\n", 1)[1].split("<!-- readme-methods:end -->", 1)[0]
    rows = methods_rows((ROOT / "docs" / "methods" / "index.md").read_text(encoding="utf-8"))
    assert embedded == readme_methods_table(rows), "the README's methods table is stale: python -m policyc.docsite"


def test_update_readme_rewrites_only_the_methods_table(tmp_path: Path) -> None:
    (tmp_path / "docs" / "methods").mkdir(parents=True)
    index = (ROOT / "docs" / "methods" / "index.md").read_text(encoding="utf-8")
    (tmp_path / "docs" / "methods" / "index.md").write_text(index.replace("| FastV | arXiv:2403.06764 | llm |",
                                                                          "| FastV2 | arXiv:2403.06764 | llm |"))
    (tmp_path / "README.md").write_text(README)
    assert update_readme(tmp_path)
    updated = (tmp_path / "README.md").read_text()
    assert updated.replace("| FastV2 ([`fastv`]", "| FastV ([`fastv`]") == README
    assert not update_readme(tmp_path)
