"""Lowering a checked policy onto a model: layers, parameter values, requirements, `compile --emit`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import tiny_llava_clip, tiny_llava_siglip

from policyc.cli import main
from policyc.compiler.plan import lower
from policyc.errors import PolicyError
from policyc.lang import check_source, check_stdlib, ir
from policyc.models import adapt

CLIP = adapt(tiny_llava_clip())  # 3 encoder layers, 4 LLM layers, CLS
SIGLIP = adapt(tiny_llava_siglip())
STDLIB = check_stdlib()


def one(text: str) -> object:
    return check_source(text, "p.tokpol")[0]


def test_fastv_binds_its_layer_and_ratio() -> None:
    plan = lower(STDLIB["fastv"], CLIP)
    (stage,) = plan.stages
    assert (stage.point, stage.kind, stage.layers) == ("llm.layer", "llm", (1,))
    assert stage.value("ratio") == ir.Percent(value=50)
    assert plan.at("llm.layer", 1) == [stage] and plan.at("llm.layer", 2) == []


def test_search_assignments_override_defaults_and_layers() -> None:
    plan = lower(STDLIB["fastv"], CLIP, {"ratio": ir.Percent(value=25), "layer": ir.Number(value=-2)})
    (stage,) = plan.stages
    assert stage.layers == (2,) and stage.value("ratio") == ir.Percent(value=25)


def test_unknown_assignment_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(PolicyError, match="no searchable parameter 'ratoi'") as caught:
        lower(STDLIB["fastv"], CLIP, {"ratoi": ir.Percent(value=25)})
    assert caught.value.diagnostics[0].hint == "did you mean 'ratio'?"


def test_assignments_must_match_the_parameter_kind() -> None:
    with pytest.raises(PolicyError, match=r"holds values like 50%, not 0\.5"):
        lower(STDLIB["fastv"], CLIP, {"ratio": ir.Number(value=0.5)})
    with pytest.raises(PolicyError, match=r"holds values like 1, not 1\.5"):
        lower(STDLIB["fastv"], CLIP, {"layer": ir.Number(value=1.5)})


def test_negative_and_star_layers_become_model_indices_in_execution_order() -> None:
    checked = one("""policy p {
      stage encoder.layer[-1] { keep top 50% of vision by attention(cls -> vision) }
      stage encoder.layer[*].attention { merge bipartite(r=1) of vision by keys }
      stage llm.layer[-2, 0] { keep top 50% of vision by attention(last -> vision) }
    }""")
    stages = lower(checked, CLIP).stages  # type: ignore[arg-type]
    assert [(s.point, s.layers) for s in stages] == [
        ("encoder.layer.attention", (0, 1, 2)), ("encoder.layer", (2,)), ("llm.layer", (0, 2))]


def test_used_policy_parameters_resolve_through_overrides() -> None:
    checked = one("policy p { param share = 30% in [10%, 50%]\n use fastv(ratio=share, layer=2) }")
    (stage,) = lower(checked, CLIP).stages  # type: ignore[arg-type]
    assert stage.layers == (2,) and stage.value("ratio") == ir.Percent(value=30)
    assert stage.label == "fastv: llm.layer[layer]"


def test_cls_on_siglip_fails_at_the_policy_line() -> None:
    checked = one("policy p {\n  stage encoder.layer[1] {\n    keep top 50% of vision by attention(cls -> vision)\n"
                  "  }\n}")
    with pytest.raises(PolicyError) as caught:
        lower(checked, SIGLIP)  # type: ignore[arg-type]
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.span is not None and (diagnostic.span.line, diagnostic.span.column) == (3, 41)
    assert "has no CLS token" in diagnostic.message
    assert lower(checked, CLIP).stages[0].layers == (1,)  # type: ignore[arg-type]


def test_layers_past_the_model_and_colliding_layers_are_errors() -> None:
    with pytest.raises(PolicyError, match="LLM layer 6 does not exist"):
        lower(STDLIB["sparsevlm"], CLIP)
    checked = one("""policy p {
      stage encoder.layer[2] { keep top 50% of vision by key_norm }
      stage encoder.layer[-1] { keep top 50% of vision by key_norm }
    }""")
    with pytest.raises(PolicyError, match=r"two stages run at encoder.layer\[2\] on this model"):
        lower(checked, CLIP)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llava")
    tiny_llava_clip().save_pretrained(path)
    return path


def test_compile_emits_the_plan_and_the_ir(saved_model: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(saved_model), "fastv", "--emit", "plan", "--param", "ratio=25%"])
    assert result.exit_code == 0, result.output
    assert "stage llm.layer[layer] -> llm.layer[1]  (llm)" in result.stdout
    assert "param ratio = 25%" in result.stdout and "LlavaForConditionalGeneration" in result.stdout
    result = runner.invoke(main, ["compile", str(saved_model), "fastv", "--emit", "ir"])
    assert result.exit_code == 0 and '"name": "fastv"' in result.stdout


def test_compile_reports_policy_and_model_problems(saved_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["compile", str(saved_model), "mustdrop", "--emit", "plan"])
    assert result.exit_code == 1
    source = (Path(__file__).parents[1] / "policies" / "mustdrop.tokpol").read_text().splitlines()
    line = 1 + next(i for i, text in enumerate(source) if "llm.layer[2, 6, 10, 14]" in text)
    assert f"<stdlib>/mustdrop.tokpol:{line}:9: error: LLM layer 6 does not exist" in result.stderr
    result = runner.invoke(main, ["compile", str(tmp_path / "nothing"), "fastv", "--emit", "plan"])
    assert result.exit_code == 1 and "nothing" in result.stderr
    result = runner.invoke(main, ["compile", str(saved_model), "fastv", "--emit", "plan", "--param", "ratio=@"])
    assert result.exit_code == 1 and "is not a value" in result.stderr
