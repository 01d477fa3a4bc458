"""The README stays true: its commands are CI's commands, its catalog is the registries'."""

from __future__ import annotations

import re
from pathlib import Path

from policyc.show import catalog_markdown

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _ci_command(name: str) -> str:
    match = re.search(rf'^{name}="(.*)"$', (ROOT / ".ci" / "run").read_text(), re.MULTILINE)
    assert match, f"{name} missing from .ci/run"
    return match.group(1)


def test_readme_starts_with_the_two_ci_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", README, re.DOTALL)
    assert blocks[:2] == [_ci_command("SETUP_COMMAND"), _ci_command("TEST_COMMAND")]
    assert README.index(blocks[0]) < README.index("## Language reference")


def test_readme_catalog_is_generated_from_the_registries() -> None:
    embedded = README.split("<!-- catalog:start -->\n", 1)[1].split("<!-- catalog:end -->", 1)[0]
    assert embedded == catalog_markdown(), "run `policyc list --markdown` and paste it into README.md"
