"""The checker and resolver on valid policies: stdlib, `use`, imports, requirements, stage graph."""

from __future__ import annotations

from pathlib import Path

import networkx
import pytest

from policyc.errors import PolicyError
from policyc.lang import check_path, check_source, check_stdlib
from policyc.lang.graph import build_graph

DATA = Path(__file__).parent / "data"
STDLIB = check_stdlib()


def test_stdlib_has_the_hand_written_policies() -> None:
    assert {"fastv", "tome", "pyramiddrop", "mustdrop", "h2o", "visionzip", "snapkv", "streamingllm",
            "random_drop", "grid", "pool", "pyramiddrop_snapkv"} <= set(STDLIB)


@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_stage_graph_is_a_dag_in_execution_order(name: str) -> None:
    checked = STDLIB[name]
    graph = build_graph(checked).to_networkx()
    assert networkx.is_directed_acyclic_graph(graph)
    stages = [n for n, kind in graph.nodes(data="kind") if kind == "stage"]
    assert stages == [f"stage:{plan.label}" for plan in checked.stages]
    assert len(stages) == len(checked.stages) >= 1


def test_stages_run_in_hook_order_not_text_order() -> None:
    text = """
    policy p {
      stage decode { cache full }
      stage llm.layer[4] { keep top 50% of vision by attention(last -> vision) }
      stage projector.output { keep top 80% of vision by random }
      stage encoder.layer[3] { merge bipartite(r=4) of vision by keys }
      stage encoder.layer[3].attention { merge bipartite(r=4) of vision by keys }
    }
    """
    labels = [plan.label for plan in check_source(text)[0].stages]
    assert labels == ["encoder.layer[3].attention", "encoder.layer[3]", "projector.output", "llm.layer[4]", "decode"]


def test_mustdrop_graph_links_key_set_to_the_protect_action() -> None:
    graph = build_graph(STDLIB["mustdrop"])
    key = "def:mustdrop:key"
    assert graph.nodes[key].kind == "set"
    consumers = {graph.nodes[t].label for s, t, kind in graph.edges if s == key and kind == "data"}
    assert consumers == {"protect"}
    signals = {n.label for n in graph.nodes.values() if n.kind == "signal"}
    assert "attention(cls -> vision)" in signals and "attention(text -> vision, queries=max)" in signals
    assert "digraph" in graph.to_dot() and graph.to_mermaid().startswith("flowchart TD")


def test_requirements_are_recorded_for_compile_time() -> None:
    needs = {(r.what, r.value) for r in STDLIB["mustdrop"].requirements}
    assert {("cls_token", None), ("encoder_layer", 0), ("encoder_layer", -1), ("llm_layer", 14)} <= needs
    sparse = {(r.what, r.value) for r in STDLIB["sparsevlm"].requirements}
    assert ("llm_layer", 15) in sparse
    # layers written with depth (and the next layers they read) are only known on a model: checked when bound
    assert not {r for r in STDLIB["pyramiddrop"].requirements if r.what == "llm_layer"}


def test_use_by_name_alias_and_stage_with_overrides() -> None:
    checked = {c.program.policy.name: c for c in check_path(DATA / "imports" / "main.tokpol")}
    by_name = checked["by_name"]
    assert [p.label for p in by_name.stages] == ["shared_prune: projector.output"]
    assert by_name.program.scopes[1].overrides["ratio"].value == 20
    assert [p.label for p in checked["by_alias"].stages] == ["shared_prune: projector.output"]
    by_stage = checked["by_stage"]
    assert [p.label for p in by_stage.stages] == ["shared_prune: projector.output", "h2o: decode"]
    searchable = [s.qualified(p.name) for s in by_stage.program.scopes for p in s.policy.params
                  if p.name not in s.overrides]
    assert searchable == ["share", "h2o.heavy", "h2o.recent"]


def test_errors_in_several_policies_are_all_reported() -> None:
    text = "policy a { use nope }\npolicy b { stage llm.layer[1] { keep visoin } }\n"
    with pytest.raises(PolicyError) as caught:
        check_source(text, "two.tokpol")
    messages = [d.message for d in caught.value.diagnostics]
    assert messages == ["unknown policy 'nope'", "unknown name 'visoin'"]


@pytest.mark.parametrize(("statement", "ok"), [
    ("keep top 50% of vision by attention(last -> vision, heads=reduce)", True),
    ("keep top 50% of vision by attention(last -> vision, layer=k)", True),
    ("keep top k of vision by attention(last -> vision)", True),
    ("keep top ratio of vision by attention(last -> vision)", False),  # a real number is not an amount
    ("keep top round(k * ratio) of vision by attention(last -> vision)", True),
    ("keep (top k of vision by key_norm) | (top 10% of vision by random)", True),
    ("keep vision where normalize(attention(all -> vision)) > 0.01 or not key_norm < 1", True),
    ("drop vision[0] & (top 5 of vision by diversity)", True),
])
def test_parameters_and_expressions_typecheck(statement: str, ok: bool) -> None:
    text = f"""policy p {{
      param reduce = mean in {{mean, max}}
      param k = 64 in [8, 128]
      param ratio = 0.5 in [0.1, 0.9]
      stage llm.layer[3] {{ {statement} }}
    }}"""
    if ok:
        check_source(text)
    else:
        with pytest.raises(PolicyError):
            check_source(text)
