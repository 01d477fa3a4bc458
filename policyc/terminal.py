"""Where the commands print: a rich console whose tables stay whole when the output goes to a pipe or a file, and
the `--json FILE` option every command that prints a table takes (`--json -`: the JSON on standard output, the
tables on standard error)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

# Off a terminal rich would cut every table to 80 columns (`pre…` headers in `policyc bench | tee out.txt`); this
# width is never reached, so tables print at their natural width and text lines unwrapped.
UNLIMITED_WIDTH = 10_000

STDOUT = Path("-")

JSON_OPTION = click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Also write the results as JSON to this file (`-`: standard output, the tables going to standard error).")


def console(json_path: Path | None = None) -> Console:
    """Rich's console for a command's tables: on a terminal as wide as the terminal; otherwise (a pipe, a file,
    a test's runner) as wide as the tables need, unless COLUMNS says otherwise. With `--json -` the tables go to
    standard error, so that standard output is the JSON alone."""
    stderr = json_path == STDOUT
    probe = Console(stderr=stderr)
    if probe.is_terminal or os.environ.get("COLUMNS"):
        return probe
    return Console(stderr=stderr, width=UNLIMITED_WIDTH)


def write_json(json_path: Path, data: Any, tables: Console) -> None:
    """`data` as indented JSON to `json_path` (`-`: standard output); `tables` says where it went."""
    text = json.dumps(data, indent=2) + "\n"
    if json_path == STDOUT:
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    json_path.write_text(text)
    tables.print(f"wrote {json_path}")


__all__ = ["JSON_OPTION", "STDOUT", "UNLIMITED_WIDTH", "console", "write_json"]
