"""The registries are consistent with the grammar and with each other."""

from __future__ import annotations

import re

import pytest

from policyc.catalog import FUNCTIONS, REGISTRIES, SCHEDULES, SELECTORS, SIGNALS, STATEMENTS, Registry
from policyc.lang import ir
from policyc.lang.build import parse
from policyc.lang.parser import CORE_SELECTORS, extra_selectors
from policyc.resources import grammar_text

GRAMMAR = grammar_text()


def test_every_statement_and_selector_has_its_grammar_keyword() -> None:
    """Statements and the five core selectors are keywords of grammar/tokpol.lark; every other selector becomes one
    from its declaration (policyc.lang.parser.extra_selectors), in the form its `by` says."""
    alternatives = re.search(r"^_statement: (.*)$", GRAMMAR, re.MULTILINE).group(1).split(" | ")  # type: ignore[union-attr]
    assert len(alternatives) == len(STATEMENTS.specs)
    for spec in STATEMENTS:
        assert f'"{spec.name}"' in GRAMMAR, spec.name
    assert {f'"{name}"' for name in CORE_SELECTORS} <= set(re.findall(r'"\w+"', GRAMMAR))
    extra = dict(extra_selectors())
    for spec in SELECTORS:
        assert spec.name in CORE_SELECTORS or extra[spec.name] == (spec.by is not None), spec.name
        source = f"policy p {{ stage llm.layer[1] {{ keep {spec.name} 4 of vision{' by keys' if spec.by else ''} }} }}"
        selection = parse(source).policies[0].stages[0].body[0].target
        assert isinstance(selection, ir.Select) and selection.selector == spec.name


def test_callable_names_are_unambiguous() -> None:
    names = [*FUNCTIONS.names(), *SIGNALS.names(), *SCHEDULES.names()]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_specs_are_documented_and_option_defaults_are_valid_syntax(registry: Registry) -> None:
    for spec in registry:
        assert spec.summary and "\n" not in spec.summary and "|" not in spec.summary, spec.name
        for option in spec.options:
            assert option.summary, (spec.name, option.name)
            if option.default is not None:
                parse(f"policy p {{ param x = {option.default} }}")  # a literal a user could write


def test_each_operator_name_is_one_declaration_beside_its_code() -> None:
    from policyc.passes import CACHE_OPS, FEATURE_OPS, MERGE_OPS, SELECTOR_OPS, SIGNAL_OPS

    from policyc.catalog import CACHES, MERGES, SELECTORS

    pairs = ((SIGNALS, {**SIGNAL_OPS, **FEATURE_OPS}), (SELECTORS, SELECTOR_OPS), (MERGES, MERGE_OPS),
             (CACHES, CACHE_OPS))
    for registry, ops in pairs:
        assert sorted(registry.names()) == sorted(ops), registry.kind  # no name without code, no code without a name
        for name, op in ops.items():
            assert registry.specs[name] is op.spec, name  # the catalog holds the operator's own declaration
            assert op.spec.unimplemented <= {o.name for o in op.spec.options}, name


def test_each_registry_is_listed_once() -> None:
    from policyc.show import catalog_markdown

    titles = [r.title for r in REGISTRIES]
    assert len(titles) == len(set(titles))
    assert [line[2:-2] for line in catalog_markdown().splitlines() if line.startswith("**")] == titles


def test_operator_package_imports_on_its_own() -> None:
    import subprocess
    import sys

    for module in ("policyc.passes", "policyc.runtime", "policyc.compiler.plan"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
