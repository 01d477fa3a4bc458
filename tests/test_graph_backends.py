"""The graph backends against the eager backend (the reference semantics): the LLM's prefill graph,
captured by torch.compile (dynamo + aot_autograd) and rewritten by the `stage_drop` graph pass, run as
it is (`fx`) or compiled by inductor (`inductor`), selects the same tokens and gives the same outputs
(fp32: max abs diff <= 1e-5), with dynamic and static caches, original and compact positions, scores
at the layer and with `layer=next`, and batches with left padding."""

from __future__ import annotations

import pytest
import torch
from generation import assert_one_compiled_decode_graph
from test_runtime import FASTV, TWO_STAGES, policy
from tiny_models import make_inputs, tiny_llava_clip

from policyc.errors import PolicyError
from policyc.runtime import compile_model

COMPACT_NEXT = TWO_STAGES.replace("heads=max) }", "heads=max)\n positions compact }").replace(
    "queries=sum) }", "queries=sum, layer=next)\n positions compact }")


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test compiles new models: start from an empty dynamo cache, away from its recompile limit."""
    torch._dynamo.reset()


def generate(model: torch.nn.Module, inputs: dict, static: bool):  # type: ignore[no-untyped-def]
    options = {"cache_implementation": "static"} if static else {}
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **options)


def assert_backends_agree(text: str, backend: str, static: bool, seed: int = 0) -> list:  # type: ignore[type-arg]
    """Eager then `backend` on one model: same kept positions and tokens, logits within 1e-5."""
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=seed)
    eager = compile_model(model, policy(text))
    expected = generate(model, inputs, static)
    expected_kept = eager.kept_positions.clone()
    eager.remove()
    compiled = compile_model(model, policy(text), backend=backend)
    result = generate(model, inputs, static)
    assert torch.equal(compiled.kept_positions, expected_kept), "both backends select the same tokens"
    assert torch.equal(result.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(result.logits, expected.logits, strict=True)):
        assert float((a - b).abs().max()) <= 1e-5, f"step {step}"
    graphs = list(compiled.graphs)
    compiled.remove()
    return graphs


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("text", [FASTV, COMPACT_NEXT], ids=["fastv", "two_stages_compact_next"])
def test_rewritten_graphs_without_inductor_agree_with_the_eager_backend(text: str, static: bool) -> None:
    graphs = assert_backends_agree(text, "fx", static, seed=1)
    prefill = [g for g in graphs if g.phase == "prefill"]
    assert prefill and all(g.passes == ("stage_drop",) for g in prefill)
    code = prefill[0].module.code
    assert code.count("torch.ops.policyc.llm_stage.default(") == text.count("stage llm.layer")
    assert "torch.ops.policyc.prefill_mask.default(" in code and "torch.ops.policyc.take_rows.default(" in code
    assert ("torch.ops.policyc.renumber.default(" in code) == (text == COMPACT_NEXT)


def test_inductor_agrees_with_the_eager_backend() -> None:
    graphs = assert_backends_agree(COMPACT_NEXT, "inductor", static=False, seed=3)
    prefill = [g.passes for g in graphs if g.phase == "prefill"]  # dynamo may capture twice (a restart)
    assert prefill and all(passes == ("stage_drop",) for passes in prefill)


def test_inductor_with_a_static_cache_agrees_with_the_eager_backend() -> None:
    assert_backends_agree(FASTV, "inductor", static=True, seed=4)


def test_a_prefill_the_graph_pass_could_not_rewrite_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """If torch.compile split the decoder so the pass never saw a stage, the model must not run uncompressed."""
    from policyc.passes import GRAPH_PASSES

    monkeypatch.setattr(GRAPH_PASSES["stage_drop"], "run", lambda graph, ctx: True)  # a pass that does nothing
    model = tiny_llava_clip()
    compile_model(model, policy(FASTV), backend="fx")
    with pytest.raises(PolicyError, match=r"the fx backend's prefill did not run the stage at llm.layer\[1\]"):
        generate(model, make_inputs(model), static=False)


def test_stages_the_graphs_cannot_run_yet_fail_at_compile_time() -> None:
    text = "policy p {\n  stage projector.output {\n    keep top 50% of vision by random(seed=1)\n  }\n}"
    with pytest.raises(PolicyError) as caught:
        compile_model(tiny_llava_clip(), policy(text), backend="inductor")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.message == "projector stages are not implemented by the inductor backend yet"
    assert diagnostic.span is not None and diagnostic.span.line == 2


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(PolicyError, match="unknown backend 'tvm'"):
        compile_model(tiny_llava_clip(), policy(FASTV), backend="tvm")  # type: ignore[arg-type]



def test_transformers_compiled_static_cache_decode_traces_through_the_graph_backend() -> None:
    """With a static cache, transformers compiles the decode step itself (CUDA graphs on a GPU): the graph backend's
    compiled decoder is traced there as plain code (no break at its config patch), so decoding is one graph next to
    the backend's prefill graph, and generates what the eager backend does."""
    model = tiny_llava_clip(seed=4)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=4)
    eager = compile_model(model, policy(FASTV))
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False, cache_implementation="static")
    eager.remove()
    compile_model(model, policy(FASTV), backend="fx")
    assert_one_compiled_decode_graph(model, inputs, expected, graphs=2, max_new_tokens=5)


def test_every_decode_step_runs_one_decode_graph() -> None:
    """The first decode step is captured with the generated-token count as a dynamic size, not specialized to 1
    (which compiled a second decode graph at the second step: a padded batch remaps its mask columns)."""
    model = tiny_llava_clip(seed=5)
    compiled = compile_model(model, policy(FASTV), backend="fx")
    for seed, images in ((0, 1), (1, 2)):
        with torch.no_grad():
            model.generate(**make_inputs(model, batch=2, pad_left=2, seed=seed, images=images), min_new_tokens=5,
                           max_new_tokens=5, do_sample=False)
    assert [graph.phase for graph in compiled.graphs] == ["prefill", "decode"]


def test_inductor_compiles_nothing_new_for_prompts_keeping_other_counts() -> None:
    """Prompts of 1, 2 and 3 images keep 8, 16 and 24 image tokens: the prompt length and the kept length are
    dynamic sizes in the compiled prefill and decode graphs, so after the first prompt (its prefill graph and its
    decode graph) no prompt compiles anything; the kept tokens are those the eager backend keeps."""
    from torch._dynamo.utils import counters

    def decode_four(inputs: dict) -> None:  # every prompt decodes 4 steps
        with torch.no_grad():
            model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)

    model = tiny_llava_clip(seed=5)
    prompts = [make_inputs(model, seed=seed, images=images) for seed, images in ((0, 1), (1, 2), (2, 3), (3, 2))]
    eager = compile_model(model, policy(FASTV))
    expected = []
    for inputs in prompts:
        decode_four(inputs)
        expected.append(eager.kept_positions.clone())
    eager.remove()
    compiled = compile_model(model, policy(FASTV), backend="inductor")
    graphs = []
    for inputs, kept in zip(prompts, expected, strict=True):
        decode_four(inputs)
        assert torch.equal(compiled.kept_positions, kept)
        graphs.append(counters["stats"]["unique_graphs"])
    compiled.remove()
    assert len({k.shape[1] for k in expected}) == 3  # three kept lengths
    assert graphs[1:] == [graphs[0]] * 3, f"graphs compiled after each prompt: {graphs}"
