"""The Python API: policyc.parse, policyc.compile (in place, returns the model), policyc.load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc.errors import PolicyError
from policyc.runtime import CompiledModel, compile_model
from policyc.runtime.compiled import PolicyLayer

ROOT = Path(__file__).parent.parent
TWO = "policy a {\n  stage llm.layer[1] { keep top 50% of vision by attention(last -> vision) }\n}\n" \
      "policy b {\n  stage llm.layer[2] { keep top 25% of vision by key_norm }\n}\n"


def _greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=5, do_sample=False)


def test_parse_text_path_and_stdlib_name(tmp_path: Path) -> None:
    assert policyc.parse("fastv").program.policy.name == "fastv"
    assert policyc.parse(ROOT / "policies" / "fastv.tokpol").program.policy.name == "fastv"
    assert policyc.parse(str(ROOT / "policies" / "fastv.tokpol")).program.policy.name == "fastv"
    assert policyc.parse(TWO, name="b").program.policy.name == "b"
    (tmp_path / "two.tokpol").write_text(TWO)
    assert policyc.parse(tmp_path / "two.tokpol", name="a").program.policy.name == "a"


def test_parse_errors_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"holds 2 policies \(a, b\)") as error:
        policyc.parse(TWO)
    assert "name='a'" in str(error.value)
    with pytest.raises(PolicyError, match="did you mean 'fastv'"):
        policyc.parse("fastvv")
    with pytest.raises(PolicyError, match="unknown name 'visoin'"):
        policyc.parse("policy p {\n  stage llm.layer[1] { keep visoin }\n}\n")
    with pytest.raises(PolicyError, match="no policy 'c'"):
        policyc.parse(TWO, name="c")


def test_compile_rewrites_in_place_and_returns_the_model() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    reference = tiny_llava_clip()
    expected = _greedy(reference, inputs)
    direct = compile_model(reference, "fastv", {"ratio": policyc._expr("ratio", "25%")})
    expected_compiled = _greedy(reference, inputs)
    direct.remove()

    assert policyc.compile(model, "fastv", ratio="25%") is model
    assert isinstance(model.policyc, CompiledModel)
    assert torch.equal(_greedy(model, inputs), expected_compiled)
    assert model.policyc.kept_positions.shape[1] == inputs["input_ids"].shape[1] - 12  # 16 image tokens -> 4
    model.policyc.remove()
    assert torch.equal(_greedy(model, inputs), expected)


def test_compile_again_replaces_the_previous_policy() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    policyc.compile(model, "fastv", ratio="25%")
    policyc.compile(model, policyc.parse("fastv"), params={"ratio": "50%", "layer": 2})
    assert not any(isinstance(layer.inner, PolicyLayer) for layer in model.policyc.plan.adapter.decoder_layers
                   if isinstance(layer, PolicyLayer))
    again = _greedy(model, inputs)
    fresh = tiny_llava_clip()
    policyc.compile(fresh, "fastv", ratio="50%", layer=2)
    assert torch.equal(again, _greedy(fresh, inputs))
    assert model.policyc.kept_positions.shape[1] == inputs["input_ids"].shape[1] - 8


def test_compile_model_twice_without_remove_is_refused() -> None:
    """The low-level compile_model never stacks two rewrites (generate() wrappers, layer wrappers) silently."""
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    expected = _greedy(model, inputs)
    first = compile_model(model, "mmtok")  # a projector stage that wraps generate() to read the question
    with pytest.raises(PolicyError, match="already compiled with a policy"):
        compile_model(model, "fastv")
    first.remove()
    assert torch.equal(_greedy(model, inputs), expected)
    compile_model(model, "fastv").remove()  # after remove() it compiles again
    assert torch.equal(_greedy(model, inputs), expected)


@pytest.mark.parametrize(("values", "message"), [
    ({"ratio": 0.25}, "holds values like 50%, not 0.25"),
    ({"ratio": True}, "is not a value"),
    ({"ratio": "25 %%"}, "is not a value"),
    ({"ratoi": "25%"}, "did you mean 'ratio'"),
    ({"ratio": "250%"}, "percentage 250% is outside 0%..100%"),  # was compiled as "keep everything"
])
def test_compile_rejects_bad_parameter_values(values: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        policyc.compile(tiny_llava_clip(), "fastv", **values)


def test_import_policyc_does_not_import_torch() -> None:
    code = "import sys, policyc; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
