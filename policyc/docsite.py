"""The documentation site's generated pages, never hand-kept: the catalog (from the registries) and one page per
standard-library policy, built from its file (header comments, title, paper, description, parameters, stages,
stage graph, the operators it names) and its row of the methods table in docs/methods/index.md (status, proof,
deviations). `docs/gen_pages.py` writes them into the site while `mkdocs build` runs."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from policyc.catalog import CACHES, FUNCTIONS, MERGES, POSITIONS, REGISTRIES, SCHEDULES, SELECTORS, SIGNALS, Registry
from policyc.lang import CheckedPolicy, check_path, ir
from policyc.lang.graph import build_graph
from policyc.lang.printer import print_expr, print_statement
from policyc.show import catalog_markdown, stage_summary

METHODS_START, METHODS_END = "<!-- methods:start -->", "<!-- methods:end -->"
README_START, README_END = "<!-- readme-methods:start -->", "<!-- readme-methods:end -->"


@dataclass(frozen=True)
class MethodRow:
    """One row of the methods table: `policy` is the file's stem, or None for a method not implemented yet."""

    method: str
    paper: str
    stages: str
    policy: str | None
    status: str  # proven, runs or not yet
    proof: str  # what follows the status word: the tests, or why not yet
    notes: str  # deviations and notes


def methods_rows(markdown: str) -> list[MethodRow]:
    """The rows of the methods table between `<!-- methods:start -->` and `<!-- methods:end -->` in `markdown`."""
    if METHODS_START not in markdown or METHODS_END not in markdown:
        raise ValueError(f"no methods table: the text lacks {METHODS_START} ... {METHODS_END}")
    table = markdown.split(METHODS_START, 1)[1].split(METHODS_END, 1)[0]
    rows = []
    for line in table.strip().splitlines()[2:]:  # after the header and its rule
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        if len(cells) != 6:
            raise ValueError(f"a methods table row needs 6 cells, not {len(cells)}: {line}")
        method, paper, stages, policy, status, notes = cells
        linked = re.match(r"\[`(\w+)\.tokpol`\]", policy)
        word, _, proof = status.partition(":")
        rows.append(MethodRow(method, paper, stages, linked.group(1) if linked else None, word.strip("* "),
                              proof.strip(), notes))
    return rows


def paper_link(paper: str) -> str:
    """`arXiv:2403.06764` as a link to its abstract; anything else as written."""
    found = re.fullmatch(r"arXiv:(\d{4}\.\d{4,5})", paper.strip())
    return f"[{paper}](https://arxiv.org/abs/{found.group(1)})" if found else paper


def _nodes(node: object) -> Iterator[BaseModel]:
    """Every IR node under `node`, depth first."""
    if isinstance(node, BaseModel):
        yield node
        for name in type(node).model_fields:
            yield from _nodes(getattr(node, name))
    elif isinstance(node, tuple | list):
        for item in node:
            yield from _nodes(item)


def operators_used(checked: CheckedPolicy) -> list[tuple[Registry, str]]:
    """The catalog entries a policy's stages name (signals, functions, schedules, selectors, merges, caches,
    position modes), in order of first use."""
    found: list[tuple[Registry, str]] = []
    for plan in checked.stages:
        for node in _nodes(plan.placed.stage.body):
            if isinstance(node, ir.Call):
                names = [(r, node.fn) for r in (SIGNALS, FUNCTIONS, SCHEDULES) if node.fn in r]
            elif isinstance(node, ir.Name):  # a signal or feature named without options: `by keys`
                names = [(SIGNALS, node.id)] if node.id in SIGNALS else []
            elif isinstance(node, ir.Select):
                names = [(SELECTORS, node.selector)]
            elif isinstance(node, ir.Merge):
                names = [(MERGES, node.method)]
            elif isinstance(node, ir.Cache):
                names = [(CACHES, node.method)]
            elif isinstance(node, ir.Positions):
                names = [(POSITIONS, node.mode)]
            else:
                names = []
            found += [entry for entry in names[:1] if entry not in found]
    return found


def _domain(param: ir.Param) -> str:
    domain = param.domain
    if domain is None:
        return "fixed"
    if domain.kind == "choice":
        return "{" + ", ".join(print_expr(o) for o in domain.options) + "}"
    step = f" step {print_expr(domain.step)}" if domain.step else ""
    return f"[{print_expr(domain.low)}, {print_expr(domain.high)}]{step}" + (" log" if domain.log else "")


def _comment_markdown(comments: tuple[str, ...]) -> list[str]:
    """A policy's header comments as Markdown: `- ` lines start list items, indented lines continue the item
    above, other lines are paragraphs."""
    blocks: list[str] = []
    listing = False
    for raw in comments:
        line = raw.removeprefix("#").removeprefix(" ").rstrip()
        if line.startswith("- "):
            blocks.append(line)
            listing = True
        elif blocks and line and (line.startswith(" ") or not listing):
            blocks[-1] += " " + line.strip()
        elif line:
            blocks.append(line)
            listing = False
    out: list[str] = []
    for index, block in enumerate(blocks):
        out.append(block)
        following = blocks[index + 1] if index + 1 < len(blocks) else ""
        if not (block.startswith("- ") and following.startswith("- ")):
            out.append("")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _policy_section(checked: CheckedPolicy, heading: str) -> list[str]:
    policy = checked.program.policy
    out = [f"{heading} `{policy.name}`", ""]
    facts = [f"stages: {stage_summary(checked)}"]
    if paper := policy.meta_value("paper"):
        facts.insert(0, f"paper: {paper_link(paper)}")
    out += [" · ".join(facts), ""]
    if description := policy.meta_value("description"):
        out += [f"> {description}", ""]
    out += _comment_markdown(policy.comments)
    params = [(scope.qualified(p.name), p) for scope in checked.program.scopes for p in scope.policy.params
              if p.name not in scope.overrides]
    sub = heading + "#"
    if params:
        out += [f"{sub} Parameters", "", "| parameter | default | search domain |", "|---|---|---|"]
        out += [f"| `{name}` | `{_cell(print_expr(p.default))}` | `{_cell(_domain(p))}` |" for name, p in params]
        out.append("")
    out += [f"{sub} Stages", "", "In execution order:", ""]
    for plan in checked.stages:
        body = [print_statement(s) for s in plan.placed.stage.body] or ["(empty)"]
        name = plan.placed.stage.name
        label = plan.label + (f" as {name}" if name else "")
        out += [f"- `{label}`", "", "    ```", *(f"    {line}" for line in body), "    ```", ""]
    out += [f"{sub} Stage graph", "", "```mermaid", build_graph(checked).to_mermaid().rstrip(), "```", ""]
    used = operators_used(checked)
    if used:
        out += [f"{sub} Operators it names", "", "| name | kind | declared by | what it does |", "|---|---|---|---|"]
        for registry, name in used:
            spec = registry.specs[name]
            link = f"[`{spec.signature()}`](../reference/catalog.md#{registry.title})"
            out.append(f"| {_cell(link)} | {registry.kind} | {registry.package(name)} | {_cell(spec.summary)} |")
        out.append("")
    if checked.requirements:
        out += [f"{sub} Checked at compile time", "", "| the model must have | why |", "|---|---|"]
        for requirement in checked.requirements:
            what = requirement.what.replace("_", " ") + ("" if requirement.value is None else f" {requirement.value}")
            out.append(f"| {_cell(what)} | {_cell(requirement.reason)} |")
        out.append("")
    return out


def policy_page(path: Path, rows: list[MethodRow]) -> str:
    """The method page of one standard-library policy file: its methods-table rows (status, proof, deviations),
    each policy's metadata, parameters, stages, stage graph and operators, the commands that run it, its source."""
    stem = path.stem
    source = path.read_text(encoding="utf-8")
    checked = check_path(path)
    mine = [row for row in rows if row.policy == stem]
    first = checked[0].program.policy
    title = mine[0].method if mine else (first.meta_value("title") or stem)
    out = [f"# {title}", "", f"<!-- generated from policies/{path.name} and docs/methods/index.md by "
           "policyc/docsite.py: edit those, not this page -->", ""]
    if (meta_title := first.meta_value("title")) and meta_title != title:
        out += [f"*{meta_title}*", ""]
    for row in mine:
        label = "" if len(mine) == 1 else f"{row.method}: "
        proof = f": {row.proof}" if row.proof else ""
        out += [f"**{label}{row.status}**{proof}", ""]
        if row.notes:
            out += [f"Deviations and notes: {row.notes}", ""]
    if not mine:
        out += ["Not in the methods table of the [standard library](index.md) yet.", ""]
    heading = "##" if len(checked) == 1 else "###"
    if len(checked) > 1:
        out += ["## Policies", ""]
    for one in checked:
        out += _policy_section(one, heading)
    name = first.name
    out += ["## Run it", "", "```bash", f"policyc show {name}", f"policyc run {name}",
            f"policyc eval default {name} --limit 100", "```", "",
            "These run on the embedded default model (an 8-layer LLM, a 24-layer CLIP tower); a stage at a layer it "
            f"lacks fails at the policy line: `policyc run random {name}` runs a 32-layer model with random weights.",
            "",
            "On your own model: [compile onto your model](../howto/compile.md), "
            "[evaluate](../howto/evaluate.md).", "",
            f"## Source: `policies/{path.name}`", "", "```", source.rstrip("\n"), "```", ""]
    return "\n".join(out)


def catalog_page() -> str:
    """The language catalog: every registry as a table (`policyc list --markdown`), and who declared what."""
    text = re.sub(r"^\*\*(\w+)\*\*$", r"## \1", catalog_markdown(), flags=re.MULTILINE)
    foreign = [(r, name, r.package(name)) for r in REGISTRIES for name in r.names() if r.package(name) != "policyc"]
    plugins = ["## Plug-ins", ""]
    if foreign:
        plugins += ["| name | kind | package |", "|---|---|---|"]
        plugins += [f"| `{name}` | {r.kind} | {package} |" for r, name, package in foreign]
    else:
        plugins.append("No installed package declares operators of its own (see [add a method](../contributing.md)).")
    return "\n".join(["# Catalog", "", "<!-- generated from the registries by policyc/docsite.py -->", "",
                      "Everything a policy can name, generated from the registries (`policyc list --markdown` "
                      "prints the same tables). Operators declare their entries beside their code in `passes/`; "
                      "installed plug-ins add theirs.", "", text.rstrip("\n"), "", *plugins, ""])


def site_pages(root: Path) -> dict[str, str]:
    """Every generated page, by its path under docs/: the catalog, one page per policy file of `root`/policies
    (with the methods table read from `root`/docs/methods/index.md) and the Methods section's navigation."""
    rows = methods_rows((root / "docs" / "methods" / "index.md").read_text(encoding="utf-8"))
    pages = {"reference/catalog.md": catalog_page()}
    paths = sorted((root / "policies").glob("*.tokpol"))
    for path in paths:
        pages[f"methods/{path.stem}.md"] = policy_page(path, rows)
    pages["methods/SUMMARY.md"] = methods_nav(rows, [path.stem for path in paths])
    return pages


def methods_nav(rows: list[MethodRow], stems: list[str]) -> str:
    """The Methods section of the site's navigation (mkdocs-literate-nav): the table, then a page per policy
    file, named as its first methods-table row names it, in the table's order (files without a row last)."""
    names: dict[str, str] = {}
    for row in rows:
        if row.policy in stems and row.policy not in names:
            names[row.policy] = row.method
    ordered = list(names) + [stem for stem in stems if stem not in names]
    lines = ["- [The standard library](index.md)", *(f"- [{names.get(stem, stem)}]({stem}.md)" for stem in ordered)]
    return "\n".join(lines) + "\n"


def readme_methods_table(rows: list[MethodRow]) -> str:
    """The README's short methods table: method (linking to its policy file), stages, status."""
    lines = ["| method | stages | status |", "|---|---|---|"]
    for row in rows:
        policy = f" ([`{row.policy}`](policies/{row.policy}.tokpol))" if row.policy else ""
        lines.append(f"| {row.method}{policy} | {row.stages or '—'} | {row.status} |")
    return "\n".join(lines) + "\n"


def update_readme(root: Path) -> bool:
    """Rewrite the README's short methods table from docs/methods/index.md; True when it changed."""
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} lacks {README_START} ... {README_END}")
    head, rest = text.split(README_START, 1)
    table = readme_methods_table(methods_rows((root / "docs" / "methods" / "index.md").read_text(encoding="utf-8")))
    new = f"{head}{README_START}\n{table}{README_END}{rest.split(README_END, 1)[1]}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":  # `python -m policyc.docsite`: after editing the methods table
    print("README.md updated" if update_readme(Path.cwd()) else "README.md already up to date")
