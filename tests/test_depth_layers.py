"""Layer indices relative to the model's depth (`llm.layer[depth / 4 - 1]`): resolved when a policy is bound, on
tiny models of several depths, shown in the plan and the compile report, and equal to the same policy written
with the absolute layers it resolves to."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc.compiler.plan import lower
from policyc.errors import PolicyError
from policyc.lang import check_source, check_stdlib
from policyc.lang.build import parse_value
from policyc.lang.printer import domain_text, print_expr
from policyc.lang.search_layers import cap_layers
from policyc.lang.search_space import space_from_policies
from policyc.models import adapt
from policyc.policy_search import load_space, search
from policyc.report import report_from_last_prefill
from policyc.runtime import compile_model

STDLIB = check_stdlib()
STAGED = """policy staged {{
  param lam = 0.6
  stage llm.layer[{layers}] as prune {{
    keep top geometric(lam) of vision by attention(last -> vision, layer=next)
    positions compact
  }}
  stage encoder.layer[{encoder}] as early {{
    keep top 75% of vision by key_norm
  }}
}}"""


def one(source: str):  # type: ignore[no-untyped-def]
    return check_source(source, "test.tokpol")[0]


@pytest.mark.parametrize("depth", [24, 28, 32, 40, 30, 8])
@pytest.mark.parametrize("name", ["pyramiddrop", "visiondrop_llm", "pyramiddrop_snapkv"])
def test_stdlib_stages_land_on_the_quarter_boundaries_of_every_depth(name: str, depth: int) -> None:
    plan = lower(STDLIB[name], adapt(tiny_llava_clip(num_llm_layers=depth)))
    llm = [s for s in plan.stages if s.kind == "llm"]
    assert [s.layers for s in llm] == [(depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1)]
    assert f"-> llm.layer[{', '.join(map(str, llm[0].layers))}]" in plan.describe()  # --emit plan shows them


@pytest.mark.parametrize(("layers", "encoder", "depth", "expected", "expected_encoder"), [
    ("depth / 4 - 1, depth / 2 - 1", "0..depth - 1 step 2", 12, (2, 5), (0, 2, 4)),
    ("1, depth - 2", "depth / 2..-1", 9, (1, 7), (2, 3, 4)),  # the encoder's depth: 5 / 2 -> 2, then to its end
    ("depth * 3 / 4 - 1", "depth / 5..depth / 5", 7, (4,), (1,)),
])
def test_arithmetic_on_depth_is_exact_then_rounded_down(layers: str, encoder: str, depth: int,
                                                         expected: tuple[int, ...],
                                                         expected_encoder: tuple[int, ...]) -> None:
    model = tiny_llava_clip(num_llm_layers=depth, num_vision_layers=6 if "depth / 5" in encoder else 5)
    plan = lower(one(STAGED.format(layers=layers, encoder=encoder)), adapt(model))
    assert {s.kind: s.layers for s in plan.stages} == {"encoder": expected_encoder, "llm": expected}


def test_relative_layers_run_as_the_absolute_layers_they_resolve_to() -> None:
    model = tiny_llava_clip(seed=3, num_llm_layers=12)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=3, text_after=5)
    results = []
    for layers, encoder in [("depth / 4 - 1, depth / 2 - 1, 3 * depth / 4 - 1", "depth - 2"), ("2, 5, 8", "1")]:
        compiled = compile_model(model, one(STAGED.format(layers=layers, encoder=encoder)))
        try:
            results.append(model.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True,
                                          return_dict_in_generate=True))
            kept = compiled.runtime.kept_at_layer
            assert sorted(kept) and len(kept[3][0]) < len(kept[2][0])  # layer 2's stage dropped tokens
        finally:
            compiled.remove()
    assert torch.equal(results[0].sequences, results[1].sequences)
    for a, b in zip(results[0].scores, results[1].scores, strict=True):
        assert torch.equal(a, b)


def test_the_compile_report_lists_the_resolved_layers() -> None:
    model = tiny_llava_clip(num_llm_layers=16)
    compiled = compile_model(model, "pyramiddrop")
    inputs = make_inputs(model, batch=1)
    try:
        model(**inputs, use_cache=False)
        report = report_from_last_prefill(compiled, inputs["input_ids"], "tiny")
    finally:
        compiled.remove()
    assert [s["layers"] for s in report.stages] == [[3, 7, 11]]
    assert report.stages[0]["label"] == "llm.layer[depth / 4 - 1, depth / 2 - 1, 3 * depth / 4 - 1]"


def test_what_still_does_not_fit_fails_at_the_policy_line() -> None:
    model = tiny_llava_clip(num_llm_layers=8)
    with pytest.raises(PolicyError) as caught:  # SparseVLM's layers are the code's absolute [2, 6, 15]
        policyc.compile(model, "sparsevlm")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.message.startswith("LLM layer 15 does not exist (llm.layer[2, 6, 15] runs there): the "
                                         "language model has 8 layers")
    assert diagnostic.hint == "valid layers: 0..7 or -8..-1" and diagnostic.span is not None
    with pytest.raises(PolicyError, match=r"depth / 4 - 3 is layer -1 on this 8-layer model"):
        lower(one(STAGED.format(layers="depth / 4 - 3", encoder="0")), adapt(model))


def test_a_searched_layer_parameter_is_checked_on_the_model() -> None:
    checked = one("""policy p {
      param layer = 1 in [0, 15]
      stage llm.layer[layer, depth - 1] { keep top 50% of vision by attention(last -> vision) }
    }""")
    adapter = adapt(tiny_llava_clip(num_llm_layers=8))
    assert lower(checked, adapter, {"layer": parse_value("3", "layer")}).stages[0].layers == (3, 7)
    with pytest.raises(PolicyError, match=r"LLM layer 12 does not exist .*: the language model has 8 layers"):
        lower(checked, adapter, {"layer": parse_value("12", "layer")})
    with pytest.raises(PolicyError, match=r"lists a layer twice on this 8-layer model"):
        lower(checked, adapter, {"layer": parse_value("7", "layer")})


def test_a_search_narrows_layer_parameters_to_the_model() -> None:
    space, notes = cap_layers(load_space("fastv,zipvl"), {"llm": 8, "encoder": 24})
    domains = {(d.policy, d.param): domain_text(d.domain) for d in space.dimensions}
    assert domains[("fastv", "layer")] == "in [0, 7]" and domains[("zipvl", "layer")] == "in [0, 7]"
    assert notes[0] == "fastv.layer searched in [0, 7], not [0, 15]: the model's LLM has 8 layers"
    assert cap_layers(load_space("fastv"), {"llm": 32, "encoder": 24})[1] == []  # [0, 15] fits 32 layers
    checked = one("""policy p {
      param first = 0 in {-30, -2, 0, 12}
      param stop = 2 in [1, 9] step 2
      stage encoder.layer[first..stop] { keep top 90% of vision by key_norm }
    }""")
    space, _ = cap_layers(space_from_policies([checked]), {"llm": 8, "encoder": 6})
    assert [domain_text(d.domain) for d in space.dimensions] == ["in {-2, 0}", "in [1, 5] step 2"]
    with pytest.raises(PolicyError, match=r"fastv.layer is searched in \[0, 15\], but the model has 0 layers"):
        cap_layers(load_space("fastv"), {"llm": 0})


def test_policyc_search_trials_only_layers_the_model_has(tmp_path: Path) -> None:
    model = tiny_llava_clip(num_llm_layers=3)
    seen: list[str] = []

    def record(compiled, candidate) -> dict[str, float]:  # type: ignore[no-untyped-def]
        seen.append(print_expr(candidate.assignments["layer"]) if candidate else "baseline")
        return {"accuracy": 1.0, "flops": 1.0}

    result = search(model, load_space("fastv"), record, model_ref="m", n_trials=6,
                    storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert result.notes == ["fastv.layer searched in [0, 2], not [0, 15]: the model's LLM has 3 layers"]
    assert seen[0] == "baseline" and {int(v) for v in seen[1:]} <= {0, 1, 2}
