"""The README stays true: its commands are CI's commands, its links lead somewhere, its methods table is the
documentation's."""

from __future__ import annotations

import re
from pathlib import Path

from policyc.docsite import methods_rows, readme_methods_table

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
    assert embedded == readme_methods_table(rows), (
        "the README's methods table is stale: paste the output of `python -c \"from pathlib import Path; "
        "from policyc.docsite import methods_rows, readme_methods_table; "
        "print(readme_methods_table(methods_rows(Path('docs/methods/index.md').read_text())), end='')\"`")
