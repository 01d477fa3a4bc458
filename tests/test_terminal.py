"""What the commands print off a terminal: tables whole (not cut to 80 columns) when piped or redirected, and
`--json FILE` (`-`: standard output, the tables on standard error) on every command that prints a table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from policyc.cli import main
from policyc.lang import check_stdlib

# pytest-xdist's workers run with COLUMNS=80 (which policyc, like rich, honours): these runs leave it unset, as a pipe
# or a redirect usually has it
RUNNER = CliRunner(env={"COLUMNS": None})


def _longest_description() -> str:
    policies = check_stdlib().values()
    return max((c.program.policy.meta_value("description") or c.program.policy.meta_value("title") or ""
                for c in policies), key=len)


def test_a_piped_table_keeps_every_cell_whole() -> None:
    """`policyc list policies | cat`: each policy's description on one line, whole (rich cut them to 80 columns,
    `Keep a max-min …`, when the output was not a terminal)."""
    environment = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    result = subprocess.run([sys.executable, "-m", "policyc.cli", "list", "policies"], capture_output=True, text=True,
                            env=environment, check=True)
    description = _longest_description()
    assert len(description) > 60
    assert any(description in line for line in result.stdout.splitlines())
    assert "…" not in result.stdout


def test_columns_still_sets_the_width() -> None:
    """COLUMNS=80 in the environment: the user's width wins, as rich does on a terminal."""
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["list", "policies"])
    assert result.exit_code == 0 and max(len(line) for line in result.stdout.splitlines()) <= 80


def test_list_json_on_standard_output_is_the_catalog_alone() -> None:
    """`policyc list --json -`: standard output parses as JSON (every registry and the standard library), the
    tables went to standard error."""
    result = RUNNER.invoke(main, ["list", "--json", "-"])
    assert result.exit_code == 0, result.output
    catalog = json.loads(result.stdout)
    assert {p["name"] for p in catalog["policies"]} == set(check_stdlib())
    assert any(s["name"] == "top" for s in catalog["selectors"])
    assert "standard library" in result.stderr


def test_list_json_of_one_kind(tmp_path: Path) -> None:
    result = RUNNER.invoke(main, ["list", "merges", "--json", str(tmp_path / "merges.json")])
    assert result.exit_code == 0, result.output
    assert list(json.loads((tmp_path / "merges.json").read_text())) == ["merges"]
    assert f"wrote {tmp_path / 'merges.json'}" in result.stdout


def test_run_json_holds_the_output_the_report_and_the_timings(tmp_path: Path) -> None:
    """`policyc run fastv --json FILE`: what the tables show, as data."""
    path = tmp_path / "run.json"
    result = RUNNER.invoke(main, ["run", "fastv", "--max-new-tokens", "2", "--json", str(path)])
    assert result.exit_code == 0, result.output
    data = json.loads(path.read_text())
    assert data["policy"] == "fastv" and data["new_tokens"] == 2
    assert f"output (2 tokens): {data['output']!r}" in result.stdout
    kept = data["report"]["kept"][0]
    assert (kept["label"], kept["before"], kept["after"]) == ("llm.layer[layer]", 144, 72)
    assert data["timings"]["prefill_ms"] > 0


def test_compile_json_is_the_report_of_the_artifact(tmp_path: Path) -> None:
    """`policyc compile default visionzip -o DIR --json -`: the JSON on standard output is the artifact's report."""
    result = RUNNER.invoke(main, ["compile", "default", "visionzip", "-o", str(tmp_path / "artifact"), "--json",
                                       "-"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads((tmp_path / "artifact" / "report.json").read_text())
    assert "tokens kept per stage" in result.stderr


@pytest.mark.parametrize("command", ["run", "compile", "eval", "search", "bench", "list"])
def test_every_command_that_prints_a_table_takes_json(command: str) -> None:
    result = RUNNER.invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--json" in result.stdout
