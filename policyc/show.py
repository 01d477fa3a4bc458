"""Human-readable views of policies, of the catalog and of the graph backends' rewritten graphs, for `policyc show`,
`policyc list` and `policyc compile --emit fx`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from policyc import terminal
from policyc.catalog import REGISTRIES, HookSpec, Registry, Spec
from policyc.errors import PolicyError, suggestion
from policyc.lang import CheckedPolicy, Loader, check_path, check_stdlib
from policyc.lang.printer import print_expr, print_statement

_KIND_REGISTRY = {r.title: r for r in REGISTRIES}


def find_policies(reference: str, loader: Loader | None = None) -> list[CheckedPolicy]:
    """`path.tokpol` (all its policies), `path.tokpol:name`, or a standard-library policy name."""
    loader = loader or Loader()
    path, _, name = reference.partition(":") if not Path(reference).exists() else (reference, "", "")
    if Path(path).is_file():
        checked = check_path(path, loader)
        if not name:
            return checked
        chosen = [c for c in checked if c.program.policy.name == name]
        if not chosen:
            names = [c.program.policy.name for c in checked]
            raise PolicyError.at(f"no policy '{name}' in {path}", None, suggestion(name, names, "policies"))
        return chosen
    stdlib = check_stdlib(loader)
    if reference not in stdlib:
        raise PolicyError.at(f"no file or standard-library policy named '{reference}'", None,
                             suggestion(reference, sorted(stdlib), "policies"))
    return [stdlib[reference]]


def find_one_policy(reference: str, loader: Loader | None = None) -> CheckedPolicy:
    """The one policy `reference` names (`find_policies`); a file holding several must be narrowed with FILE:NAME."""
    found = find_policies(reference, loader)
    if len(found) != 1:
        names = ", ".join(c.program.policy.name for c in found)
        raise PolicyError.at(f"{reference} holds {len(found)} policies ({names})", None,
                             f"name one: {reference}:{found[0].program.policy.name}")
    return found[0]


def stage_summary(checked: CheckedPolicy) -> str:
    kinds = []
    for plan in checked.stages:
        kind = plan.hook.stage_kind
        if kind not in kinds:
            kinds.append(kind)
    return " + ".join(kinds) or "none"


def render_policy(checked: CheckedPolicy, console: Console | None = None) -> None:
    console = console or terminal.console()
    policy = checked.program.policy
    title = policy.meta_value("title")
    console.print(f"[bold]policy {policy.name}[/bold]" + (f": {escape(title)}" if title else ""))
    for key in ("paper", "description"):
        if value := policy.meta_value(key):
            console.print(f"  {key}: {escape(value)}")
    params = Table("parameter", "default", "search domain", title="parameters", title_justify="left")
    for scope in checked.program.scopes:
        for param in scope.policy.params:
            if param.name in scope.overrides:
                continue
            domain = param.domain
            shown = "fixed" if domain is None else (
                "{" + ", ".join(print_expr(o) for o in domain.options) + "}" if domain.kind == "choice" else
                f"[{print_expr(domain.low)}, {print_expr(domain.high)}]" + (
                    f" step {print_expr(domain.step)}" if domain.step else "") + (" log" if domain.log else ""))
            params.add_row(scope.qualified(param.name), escape(print_expr(param.default)), escape(shown))
    if params.row_count:
        console.print(params)
    stages = Table("stage (execution order)", "statements", title="stages", title_justify="left")
    for plan in checked.stages:
        body = "\n".join(print_statement(s) for s in plan.placed.stage.body) or "(empty)"
        stages.add_row(escape(plan.label), escape(body))
    console.print(stages)
    if checked.requirements:
        needs = Table("model must have", "why", "where", title="checked at compile time", title_justify="left")
        for requirement in checked.requirements:
            what = requirement.what.replace("_", " ") + ("" if requirement.value is None else f" {requirement.value}")
            where = f"{requirement.span.file}:{requirement.span.line}" if requirement.span else ""
            needs.add_row(what, escape(requirement.reason), escape(where))
        console.print(needs)


def render_catalog(kind: str | None, console: Console | None = None) -> None:
    console = console or terminal.console()
    if kind in (None, "policies"):
        console.print(_policies_table())
    for name, registry in _KIND_REGISTRY.items():
        if kind in (None, name):
            console.print(_registry_table(name, registry))


def catalog_json(kind: str | None) -> dict[str, list[dict[str, str]]]:
    """What `policyc list [KIND]` prints, as data: per kind, each entry's name, signature, stages, summary, paper and
    the package that declares it ("policyc" for built-ins, else the plug-in's distribution)."""
    out: dict[str, list[dict[str, str]]] = {}
    if kind in (None, "policies"):
        out["policies"] = [{"name": name, "stages": stage_summary(checked),
                            "paper": checked.program.policy.meta_value("paper") or "",
                            "summary": checked.program.policy.meta_value("description")
                            or checked.program.policy.meta_value("title") or ""}
                           for name, checked in check_stdlib().items()]
    for name, registry in _KIND_REGISTRY.items():
        if kind in (None, name):
            out[name] = [{"name": spec.name, "signature": spec.signature(), "stages": _where(spec),
                          "summary": spec.summary, "paper": spec.paper or "", "package": registry.package(spec.name)}
                         for spec in registry]
    return out


def catalog_markdown() -> str:
    """Every registry as a Markdown table (the docs' catalog page is this text): policyc's own names, not
    those of installed plug-ins."""
    blocks = []
    for name, registry in _KIND_REGISTRY.items():
        rows = [f"**{name}**", "", f"| {registry.kind} | stages | what it does |", "|---|---|---|"]
        for spec in (s for s in registry if registry.package(s.name) == "policyc"):
            where = _where(spec)
            paper = f" ({spec.paper})" if spec.paper else ""
            rows.append(f"| `{spec.signature()}` | {where} | {spec.summary}{paper} |".replace("\n", " "))
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks) + "\n"


def _policies_table() -> Table:
    table = Table("policy", "stages", "paper", "what it does", title="standard library (policies/)",
                  title_justify="left")
    for name, checked in check_stdlib().items():
        policy = checked.program.policy
        line = policy.meta_value("description") or policy.meta_value("title") or ""
        table.add_row(name, stage_summary(checked), escape(policy.meta_value("paper") or ""), escape(line))
    return table


def _where(spec: Spec) -> str:
    """The stage kinds a spec works in (a hook's own kind; nothing for position modes)."""
    if isinstance(spec, HookSpec):
        return spec.stage_kind
    return "llm" if spec.kind == "positions" else ", ".join(sorted(spec.stages))


def _registry_table(name: str, registry: Registry) -> Table:
    """One registry's entries; operators (which plug-ins may add) also name the package that declares each."""
    columns = (registry.kind, "where", "what it does") + (("package",) if registry.operators else ())
    table = Table(*columns, title=name, title_justify="left")
    for spec in registry:
        where = _where(spec)
        paper = f" [dim]({escape(spec.paper)})[/dim]" if spec.paper else ""
        package = (escape(registry.package(spec.name)),) if registry.operators else ()
        table.add_row(escape(spec.signature()), where, escape(spec.summary) + paper, *package)
    return table


def fx_graphs_text(model: object, checked: object, assignments: dict) -> str:
    """Compile with the fx backend (the graph passes, without inductor), run a two-token generate() on the
    calibration prompt, and return each captured LLM graph's code as the graph passes left it."""
    import torch

    from policyc.report import calibration_inputs
    from policyc.runtime import compile_model

    compiled = compile_model(model, checked, assignments, "fx")  # type: ignore[arg-type]
    try:
        inputs = calibration_inputs(compiled.plan.adapter)
        with torch.no_grad():
            compiled.model.generate(**inputs, max_new_tokens=2, do_sample=False)  # type: ignore[operator]
        return "".join(f"# graph {number}: {graph.phase or 'no decoder layer'} (passes applied: "
                       f"{', '.join(graph.passes) or 'none'})\n{graph.module.code.strip()}\n\n"
                       for number, graph in enumerate(compiled.graphs))
    finally:
        compiled.remove()
