"""`policyc compile MODEL POLICY`: the policy's IR, its plan bound to MODEL, the fx backend's rewritten graphs, a
compile artifact, or the compile report as JSON."""

from __future__ import annotations

from pathlib import Path

import click

from policyc import terminal
from policyc.lang import Loader, ir


def compile_command(model: str, policy: str, *, emit: str | None, backend: str, output: Path | None,
                    assignments: dict[str, ir.Expr], json_path: Path | None, loader: Loader) -> None:
    """Print what `emit` names; with `output`, write a compile artifact; with `output` or `json_path`, measure the
    compile report on the calibration prompt, print it and write it as JSON."""
    from policyc.models.bundled import load_reference_model, reference_name
    from policyc.show import find_one_policy

    checked = find_one_policy(policy, loader)
    if emit == "ir":
        click.echo(checked.program.policy.model_dump_json(indent=2))  # type: ignore[attr-defined]
        if output is None and json_path is None:
            return
    reference = reference_name(model)
    loaded = load_reference_model(reference, "cpu")
    if emit == "plan":
        from policyc.compiler.plan import lower
        from policyc.models import adapt

        click.echo(lower(checked, adapt(loaded), assignments).describe(), nl=False)  # type: ignore[arg-type]
    if emit == "fx":
        from policyc.show import fx_graphs_text

        click.echo(fx_graphs_text(loaded, checked, assignments), nl=False)
    if output is None and json_path is None:
        return
    from policyc.artifact import write_artifact
    from policyc.report import calibration_inputs, measure
    from policyc.runtime import compile_model

    compiled = compile_model(loaded, checked, assignments, backend)  # type: ignore[arg-type]
    report = measure(compiled, calibration_inputs(compiled.plan.adapter), reference,
                     "calibration: the sample image and 16 text tokens")
    console = terminal.console(json_path)
    if output is not None:
        write_artifact(output, checked, loaded, reference, assignments, report.to_json())  # type: ignore[arg-type]
    report.render(console)
    if output is not None:
        console.print(f"wrote {output} (no weights: it references {reference})")
    if json_path is not None:
        terminal.write_json(json_path, report.to_json(), console)


__all__ = ["compile_command"]
