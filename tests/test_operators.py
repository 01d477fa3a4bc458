"""Operators as plug-ins (policyc.operators): a signal and a selector registered at run time check with the
language's diagnostics, search, compile and generate; broken plug-ins raise `PluginError` naming their package and
leave the registries as they were."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from click.testing import CliRunner
from policyc.passes import SELECTOR_OPS, SIGNAL_OPS
from policyc.passes.base import number_value, scatter_scores
from policyc.passes.selectors import ranked
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc import operators
from policyc.catalog import SELECTORS, SIGNALS
from policyc.cli import main
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.lang.search_space import space_from_policies
from policyc.operators import Option, PluginError, SelectorOp, SignalOp, Spec

if TYPE_CHECKING:
    from collections.abc import Iterator

    from policyc.runtime.evaluate import StageEvaluator


class KeyEnergy(SignalOp):
    """sum_d |k_d|^power of each token's head-mean attention key: [B, Hkv, L', d] -> [B, L]."""

    spec = Spec("key_energy", "signal", "energy of each token's head-mean attention key: sum of abs(k)^power",
                options=(Option("power", ("number",), "exponent", default="2", low=1, high=4),),
                stages=frozenset({"encoder", "llm"}))

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        power = number_value(self.option(call, "power", ctx), 2.0, "key_energy(power=...)", call.span)
        key = ctx.recorded("key_energy").key.float().mean(1)  # [B, L', d]
        return scatter_scores(key.abs().pow(power).sum(-1), ctx)


class Bottom(SelectorOp):
    """The `amount` candidates with the lowest score; ties go to the earlier position."""

    spec = Spec("bottom", "selector", "the tokens with the lowest score", returns="set", by="score")

    def select(self, node: ir.Select, candidates: torch.Tensor, ctx: StageEvaluator) -> torch.Tensor:
        score = ctx.score(node.by).float().masked_fill(~candidates, float("inf"))  # [B, L]
        order = torch.sort(score, dim=1, stable=True).indices
        return ranked(order, ctx.counts(node, candidates)) & candidates


POLICY = """policy low_energy {
  param power = 2 in [1, 4]
  param ratio = 50% in [10%, 90%]
  stage llm.layer[1] {
    keep SELECTOR ratio of vision by key_energy(power=power)
  }
}
"""


@pytest.fixture
def plugin() -> Iterator[None]:
    with operators.registered(KeyEnergy, Bottom, package="policyc-test-plugin"):
        yield
    assert "key_energy" not in SIGNALS and "bottom" not in SELECTORS  # removed again


def names() -> tuple[list[str], list[str], list[str], list[str]]:
    return SIGNALS.names(), SELECTORS.names(), list(SIGNAL_OPS), list(SELECTOR_OPS)


def test_a_plugin_policy_checks_with_the_language_diagnostics(plugin: None) -> None:
    checked = policyc.parse(POLICY.replace("SELECTOR", "bottom"))
    assert checked.program.policy.name == "low_energy"
    assert SIGNALS.package("key_energy") == "policyc-test-plugin" and SELECTORS.package("top") == "policyc"
    with pytest.raises(PolicyError, match="did you mean 'key_energy'") as error:
        policyc.parse(POLICY.replace("SELECTOR", "bottom").replace("key_energy(", "key_enrgy("))
    assert ":5:36" in str(error.value)  # the span of the misspelt name
    with pytest.raises(PolicyError, match="did you mean 'bottom'"):
        policyc.parse(POLICY.replace("SELECTOR", "botom"))
    with pytest.raises(PolicyError, match="power"):  # the declared bound: high=4
        policyc.parse(POLICY.replace("SELECTOR", "bottom").replace("power=power", "power=9"))


def test_a_plugin_option_is_a_search_dimension(plugin: None) -> None:
    space = space_from_policies([policyc.parse(POLICY.replace("SELECTOR", "bottom"))])
    dimensions = {d.param: d for d in space.dimensions}
    assert set(dimensions) == {"power", "ratio"}
    assert isinstance(dimensions["power"].domain, ir.RangeDomain)
    power = dimensions["power"].domain
    assert (power.low, power.high) == (ir.Number(value=1), ir.Number(value=4))


def test_a_plugin_selector_and_signal_compile_and_generate(plugin: None) -> None:
    """bottom 50% and top 50% by the same plug-in score split LLaVA's 16 image tokens into two halves."""
    kept = {}
    for selector in ("top", "bottom"):
        model = tiny_llava_clip()
        inputs = make_inputs(model)
        policyc.compile(model, policyc.parse(POLICY.replace("SELECTOR", selector)))
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + 3
        kept[selector] = set(model.policyc.kept_positions[0].tolist())
    length = inputs["input_ids"].shape[1]
    assert len(kept["top"]) == len(kept["bottom"]) == length - 8  # 8 of 16 image tokens dropped
    assert kept["top"] | kept["bottom"] == set(range(length))
    assert len(kept["top"] & kept["bottom"]) == length - 16  # only the text tokens are in both


def test_a_plugin_policy_runs_on_the_embedded_default_model(plugin: None, tmp_path: Path) -> None:
    path = tmp_path / "low_energy.tokpol"
    path.write_text(POLICY.replace("SELECTOR", "bottom"))
    result = CliRunner().invoke(main, ["run", str(path), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert " 72   " in next(x for x in result.stdout.splitlines() if "llm.layer[1]" in x)  # 50% of 144
    listing = CliRunner().invoke(main, ["list", "selectors", "--json", "-"])
    bottom = next(s for s in json.loads(listing.stdout)["selectors"] if s["name"] == "bottom")
    assert bottom["package"] == "policyc-test-plugin"


# ---------------------------------------------------------------- broken plug-ins


MODULES = {
    "plugin_missing_dependency": "import a_module_that_is_not_installed\n",
    "plugin_shadows_top": """
        from policyc.operators import SelectorOp, Spec, register

        @register
        class Top(SelectorOp):
            spec = Spec("top", "selector", "a second top", returns="set", by="score")

            def select(self, node, candidates, ctx):
                return candidates
    """,
    "plugin_one": """
        from policyc.operators import SignalOp, Spec, register

        @register
        class Shared(SignalOp):
            spec = Spec("shared_score", "signal", "ones")

            def compute(self, call, ctx):
                return ctx.state.image.float()
    """,
    "plugin_two": """
        from policyc.operators import SignalOp, Spec, register

        @register
        class SharedToo(SignalOp):
            spec = Spec("shared_score", "signal", "ones, again")

            def compute(self, call, ctx):
                return ctx.state.image.float()
    """,
    "plugin_lowest": """
        import torch
        from policyc.operators import SelectorOp, Spec, register
        from policyc.passes.selectors import ranked

        @register
        class Lowest(SelectorOp):
            spec = Spec("lowest", "selector", "the lowest-scoring tokens", returns="set", by="score")

            def select(self, node, candidates, ctx):
                score = ctx.score(node.by).float().masked_fill(~candidates, float("inf"))
                order = torch.sort(score, dim=1, stable=True).indices
                return ranked(order, ctx.counts(node, candidates)) & candidates
    """,
    "plugin_half_broken": """
        from policyc.operators import SignalOp, Spec, register

        @register
        class Fine(SignalOp):
            spec = Spec("fine_score", "signal", "ones")

            def compute(self, call, ctx):
                return ctx.state.image.float()

        @register
        class NoCompute(SignalOp):
            spec = Spec("no_compute", "signal", "declares no compute")
    """,
}


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name, text in MODULES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
        monkeypatch.delitem(sys.modules, name, raising=False)  # imported afresh: its decorators run again
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def entry(module: str) -> EntryPoint:
    return EntryPoint(name=module, value=module, group=operators.ENTRY_POINT_GROUP)


def test_a_plugin_that_fails_to_import_names_its_package(plugins: Path) -> None:
    before = names()
    with pytest.raises(PluginError, match=r"plug-in 'plugin_missing_dependency'.*failed to load: "
                                          r"ModuleNotFoundError"):
        operators.load_entry_point(entry("plugin_missing_dependency"))
    assert names() == before
    assert policyc.parse("fastv").program.policy.name == "fastv"  # the built-ins keep working


def test_an_installed_plugin_that_fails_is_a_cli_error_naming_it(plugins: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 ) -> None:
    """Installed plug-ins load on first use: one that fails stops that command with its package named (no
    traceback), the others and the built-ins load, and later commands run."""
    monkeypatch.setattr(operators, "entry_points", lambda group: [entry("plugin_missing_dependency"),
                                                                  entry("plugin_one")])
    monkeypatch.setitem(operators._state, "loaded", False)
    try:
        result = CliRunner().invoke(main, ["check", str(Path(__file__).parent.parent / "policies" / "fastv.tokpol")])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "error: policyc plug-in 'plugin_missing_dependency'" in result.stderr
        assert SIGNALS.package("shared_score") == "plugin_one"  # the other plug-in loaded
        assert CliRunner().invoke(main, ["list", "signals"]).exit_code == 0
    finally:
        operators.unregister("shared_score")


def test_an_installed_plugin_selector_parses_on_first_use(plugins: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing needs no operator (fmt imports no torch); a selector word it does not know loads the plug-ins, and
    the text is parsed again with theirs."""
    monkeypatch.setattr(operators, "entry_points", lambda group: [entry("plugin_lowest")])
    monkeypatch.setitem(operators._state, "loaded", False)
    try:
        checked = policyc.parse("policy p {\n  stage llm.layer[1] { keep lowest 50% of vision by key_norm }\n}\n")
        assert SELECTORS.package("lowest") == "plugin_lowest"
        select = checked.program.policy.stages[0].body[0].target
        assert isinstance(select, ir.Select) and select.selector == "lowest"
    finally:
        operators.unregister("lowest")


def test_a_name_declared_twice_names_both_packages(plugins: Path) -> None:
    before = names()
    with pytest.raises(PluginError, match=r"plugin_shadows_top: .*selector 'top' is already declared by policyc"):
        operators.load_entry_point(entry("plugin_shadows_top"))
    assert names() == before and SELECTORS.package("top") == "policyc"
    operators.load_entry_point(entry("plugin_one"))
    try:
        assert SIGNALS.package("shared_score") == "plugin_one"
        with pytest.raises(PluginError, match=r"plugin_two: .*signal 'shared_score' is already declared by plugin_one"):
            operators.load_entry_point(entry("plugin_two"))
    finally:
        operators.unregister("shared_score")
    assert names() == before


def test_a_module_with_one_broken_operator_registers_none(plugins: Path) -> None:
    before = names()
    with pytest.raises(PluginError, match=r"plugin_half_broken: .*'no_compute' does not implement compute"):
        operators.load_entry_point(entry("plugin_half_broken"))
    assert names() == before  # fine_score, registered first, is gone too
    assert policyc.parse("fastv").program.policy.name == "fastv"


def _signal(spec: Spec, base: type = SignalOp) -> type:
    def compute(self: object, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        return ctx.state.image.float()

    return type("Declared", (base,), {"spec": spec, "compute": compute})


@pytest.mark.parametrize(("declared", "problem"), [
    (_signal(Spec("Bad-Name", "signal", "x")), "name 'Bad-Name' must be lower-case letters"),
    (_signal(Spec("two_lines", "signal", "a\nb")), "summary must be one line"),
    (_signal(Spec("wrong_kind", "selector", "x")), "a SignalOp declares kind signal, not 'selector'"),
    (_signal(Spec("no_choices", "signal", "x", options=(Option("mode", ("enum",), "a word", default="a"),))),
     "enum option 'mode' needs `choices`"),
    (type("NoCompute", (SignalOp,), {"spec": Spec("no_compute", "signal", "x")}), "does not implement compute"),
    (type("NoSpec", (SignalOp,), {"compute": lambda self, call, ctx: None}), "declares no `spec"),
    (_signal(Spec("odd_option", "signal", "x", unimplemented=frozenset({"nope"}))), "names 'nope'"),
    (int, "is not an operator"),
])
def test_a_broken_declaration_names_the_package(declared: type, problem: str) -> None:
    before = names()
    with pytest.raises(PluginError, match=f"^my-plugin: .*{problem}"):
        operators.register(declared, "my-plugin")
    assert names() == before


def test_unregister_refuses_built_ins_and_unknown_names() -> None:
    with pytest.raises(PluginError, match="built-in operator"):
        operators.unregister("top")
    with pytest.raises(PluginError, match="no registered operator"):
        operators.unregister("never_registered")
    assert "top" in SELECTORS and "top" in SELECTOR_OPS
