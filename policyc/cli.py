"""The `policyc` command line. Exit codes: 0 ok, 1 policy error, 2 usage error.

`check`, `fmt` and `list` import neither torch nor transformers.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from policyc.errors import PolicyError

EXIT_POLICY_ERROR = 1


def _fail(error: PolicyError) -> None:
    click.echo(str(error), err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="policyc")
def main() -> None:
    """policyc: compile visual-token compression policies (.tokpol) onto vision-language models."""


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-q", "--quiet", is_flag=True, help="Print errors only.")
def check(files: tuple[Path, ...], quiet: bool) -> None:
    """Parse and validate policy FILES."""
    from policyc.lang import Loader, check_path

    loader = Loader()
    failed = 0
    for path in files:
        try:
            checked = check_path(path, loader)
        except PolicyError as error:
            _fail(error)
            failed += 1
            continue
        if not quiet:
            names = ", ".join(c.program.policy.name for c in checked) or "no policies"
            click.echo(f"ok  {path}  ({names})")
    if failed:
        click.echo(f"{failed} of {len(files)} file{'s' * (len(files) != 1)} failed", err=True)
        sys.exit(EXIT_POLICY_ERROR)


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--check", "check_only", is_flag=True, help="Change nothing; exit 1 if a file is not canonical.")
@click.option("--stdout", is_flag=True, help="Print the canonical form instead of rewriting files.")
def fmt(files: tuple[Path, ...], check_only: bool, stdout: bool) -> None:
    """Rewrite FILES in the canonical form (comments are kept)."""
    from policyc.lang.build import parse
    from policyc.lang.printer import print_file

    status = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        try:
            canonical = print_file(parse(text, str(path)))
        except PolicyError as error:
            _fail(error)
            status = EXIT_POLICY_ERROR
            continue
        if stdout:
            click.echo(canonical, nl=False)
        elif canonical == text:
            continue
        elif check_only:
            click.echo(f"would reformat {path}", err=True)
            status = EXIT_POLICY_ERROR
        else:
            _replace(path, canonical)
            click.echo(f"reformatted {path}")
    sys.exit(status)


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` atomically: a crash leaves the old file whole."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@main.command()
@click.argument("policy")
@click.option("--graph", type=click.Choice(["mermaid", "dot"]), help="Print the stage graph in this format.")
@click.option("--json", "as_json", is_flag=True, help="Print the policy's IR as JSON.")
def show(policy: str, graph: str | None, as_json: bool) -> None:
    """Show POLICY (a file, FILE:NAME, or a standard-library name): parameters, stages, requirements."""
    from policyc.show import find_policies, render_policy

    try:
        found = find_policies(policy)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)
    for checked in found:
        if as_json:
            click.echo(checked.program.policy.model_dump_json(indent=2))
        elif graph is not None:
            from policyc.lang.graph import build_graph

            built = build_graph(checked)
            click.echo(built.to_mermaid() if graph == "mermaid" else built.to_dot(), nl=False)
        else:
            render_policy(checked)


@main.command()
@click.argument("model")
@click.argument("policy")
@click.option("--emit", type=click.Choice(["ir", "plan"]), required=True,
              help="Print the policy's IR (JSON) or its plan bound to MODEL.")
@click.option("--param", "params", multiple=True, metavar="NAME=VALUE",
              help="Set a parameter, e.g. --param ratio=25%. Repeatable.")
def compile(model: str, policy: str, emit: str, params: tuple[str, ...]) -> None:
    """Bind POLICY (a file, FILE:NAME or a standard-library name) to MODEL (a local directory or hub id)."""
    from policyc.compiler.plan import lower
    from policyc.lang import Loader
    from policyc.lang.build import parse_value
    from policyc.models import load_model
    from policyc.show import find_policies

    loader = Loader()
    try:
        found = find_policies(policy, loader)
        if len(found) != 1:
            names = ", ".join(c.program.policy.name for c in found)
            raise PolicyError.at(f"{policy} holds {len(found)} policies ({names})", None,
                                 f"name one: {policy}:{found[0].program.policy.name}")
        checked = found[0]
        if emit == "ir":
            click.echo(checked.program.policy.model_dump_json(indent=2))
            return
        assignments = {}
        for item in params:
            name, sep, text = item.partition("=")
            if not sep:
                raise click.UsageError(f"--param takes NAME=VALUE, not {item!r}")
            assignments[name.strip()] = parse_value(text.strip(), f"--param {name.strip()}")
        _, adapter = load_model(model)
        click.echo(lower(checked, adapter, assignments).describe(), nl=False)
    except PolicyError as error:
        _fail(error.with_sources(loader.sources))
        sys.exit(EXIT_POLICY_ERROR)


@main.command(name="list")
@click.argument("kind", required=False,
                type=click.Choice(["policies", "hooks", "statements", "sets", "signals", "functions", "schedules",
                                   "selectors", "merges", "caches", "positions"]))
@click.option("--markdown", is_flag=True, help="Print the language catalog as Markdown tables.")
def list_(kind: str | None, markdown: bool) -> None:
    """List standard-library policies and everything a policy can name (or only KIND)."""
    from policyc.show import catalog_markdown, render_catalog

    try:
        if markdown:
            click.echo(catalog_markdown(), nl=False)
            return
        render_catalog(kind)
    except PolicyError as error:
        _fail(error)
        sys.exit(EXIT_POLICY_ERROR)


if __name__ == "__main__":
    main()
