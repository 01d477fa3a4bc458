"""policyc as an lmms-eval model (policyc.integrations.lmms_eval), run by lmms-eval itself, offline, on the bundled
model: the entry point, `policyc_synthetic`'s answers equal to `policyc eval`'s item for item (no policy, FastV,
VisionZip; 100 items), a batch equal to single runs, both interfaces, the model_args, the README's command line,
`policyc eval --lmms` and `policyc search --lmms`, another family (Gemma 3 with its processor), and bad input.

These tests need lmms-eval, which needs a torchvision built for the installed torch: CI runs them in their own venv
(`.ci/integrations-venv`). Elsewhere they are skipped, unless POLICYC_REQUIRE_INTEGRATIONS=1 makes a missing
lmms-eval a failure (as CI sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

if os.environ.get("POLICYC_REQUIRE_INTEGRATIONS") != "1":
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'policyc[lmms]')")

import torch
from click.testing import CliRunner
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.models import get_model

import policyc
from policyc.cli import main
from policyc.errors import PolicyError
from policyc.evaluation import Evaluation, evaluate, synthetic_items
from policyc.integrations.lmms_eval import tasks_dir
from policyc.integrations.lmms_eval.model import PolicycChat, PolicycSimple
from policyc.integrations.lmms_eval.runner import task_manager
from policyc.models.bundled import DEFAULT_NAME, load_reference_model, load_reference_processor
from policyc.vqa.accuracy import normalize

ITEMS = 100  # documents compared item for item with `policyc eval`
POLICIES = {"unmodified": None, "fastv": {"ratio": "25%"}, "visionzip": {}}


@pytest.fixture(scope="module")
def bundled() -> tuple[Any, Any]:
    return load_reference_model(DEFAULT_NAME), load_reference_processor(DEFAULT_NAME)


@pytest.fixture(scope="module")
def manager() -> Any:
    return task_manager()


@pytest.fixture(scope="module")
def reference(bundled: tuple[Any, Any]) -> dict[str, Evaluation]:
    """`policyc eval`'s evaluation of each policy on the first ITEMS test questions, batches of 16."""
    model, processor = bundled
    items = synthetic_items("test", ITEMS)
    out = {}
    for name, params in POLICIES.items():
        compiled = policyc.compile(model, name, **params).policyc if params is not None else None
        try:
            out[name] = evaluate(model, processor, items, compiled, name, batch_size=16)
        finally:
            if compiled is not None:
                compiled.remove()
    return out


def lmms_run(wrapper: Any, manager: Any, task: str = "policyc_synthetic", limit: int = ITEMS,
             batch_size: int = 16) -> tuple[float, list[dict[str, Any]]]:
    """lmms-eval's metric and its samples (sorted by document) for `wrapper` on `limit` documents of `task`."""
    wrapper.records.clear()
    out = simple_evaluate(model=wrapper, tasks=[task], task_manager=manager, batch_size=batch_size, limit=limit,
                          log_samples=True, device="cpu", verbosity="WARNING")
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task]["exact_match,none"], samples


def response(sample: dict[str, Any]) -> str:
    filtered = sample["filtered_resps"]
    return filtered[0] if isinstance(filtered, list) else filtered


def test_the_entry_point_registers_both_interfaces() -> None:
    assert get_model("policyc") is PolicycChat  # lmms-eval's default where a model has both
    assert get_model("policyc", force_simple=True) is PolicycSimple


def test_the_shipped_tasks_are_found_by_lmms_eval(manager: Any) -> None:
    assert {"policyc_synthetic", "policyc_synthetic_val"} <= set(manager.all_tasks)
    assert str(tasks_dir()) in subprocess.run([sys.executable, "-m", "policyc.integrations.lmms_eval"],
                                              capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("name", list(POLICIES))
def test_answers_equal_policyc_eval_item_for_item(name: str, bundled: tuple[Any, Any], manager: Any,
                                                  reference: dict[str, Evaluation]) -> None:
    """The same answers, scores, image tokens and FLOPs shares as `policyc eval` on 100 questions, batched."""
    model, _ = bundled
    params = POLICIES[name]
    wrapper = PolicycChat("default", loaded=bundled, batch_size=16)
    if params is not None:
        wrapper.use(policyc.compile(model, name, **params).policyc)
    try:
        accuracy, samples = lmms_run(wrapper, manager)
    finally:
        if wrapper.compiled is not None:
            wrapper.compiled.remove()
    expected = reference[name]
    assert [s["doc_id"] for s in samples] == list(range(ITEMS))
    assert [normalize(response(s)) for s in samples] == [p.predicted for p in expected.predictions]
    assert [s["exact_match"] for s in samples] == [p.exact for p in expected.predictions]
    assert accuracy == expected.accuracy
    records = sorted(wrapper.records, key=lambda r: r["doc_id"])
    assert [r["image_tokens"] for r in records] == [p.image_tokens for p in expected.predictions]
    assert [r["flops_share"] for r in records] == pytest.approx([p.flops_share for p in expected.predictions])
    if name == "fastv":
        assert expected.image_tokens == 36 and expected.flops_share < 0.9  # the policy did act


def test_a_batch_answers_as_single_runs_and_both_interfaces_agree(bundled: tuple[Any, Any], manager: Any) -> None:
    model, _ = bundled
    compiled = policyc.compile(model, "fastv", ratio="25%").policyc
    try:
        runs = []
        for cls, batch_size in ((PolicycChat, 8), (PolicycChat, 1), (PolicycSimple, 8)):
            wrapper = cls("default", loaded=bundled)
            wrapper.use(compiled)
            runs.append([response(s) for s in lmms_run(wrapper, manager, limit=16, batch_size=batch_size)[1]])
    finally:
        compiled.remove()
    assert runs[0] == runs[1] == runs[2]


def test_model_args_name_the_policy_its_parameters_and_the_dtype(tmp_path: Path, manager: Any) -> None:
    """`params={...}` as JSON and plain keys set the same parameters; stats_path gets each sample's costs."""
    stats = tmp_path / "stats.json"
    by_json = PolicycChat.create_from_arg_string(
        f'pretrained=default,policy=fastv,params={{"ratio":"25%","layer":2}},dtype=float32,stats_path={stats}',
        {"batch_size": 4, "device": "cpu"})
    by_keys = PolicycChat.create_from_arg_string("pretrained=default,policy=fastv,ratio=25%,layer=2,batch_size=4",
                                                 {"batch_size": 1, "device": "cpu"})  # model_args win
    assert by_keys.batch_size == 4
    assert by_json.model.dtype == torch.float32 and by_json.batch_size == 4
    assert by_json.compiled.plan.name == "fastv"
    assert lmms_run(by_json, manager, limit=8, batch_size=4)[1] == lmms_run(by_keys, manager, limit=8,
                                                                             batch_size=4)[1]
    written = json.loads(stats.read_text())
    assert written["policy"] == "fastv" and len(written["samples"]) == 8
    assert written["summary"]["policyc_synthetic"]["image_tokens"] == 36  # 25% of 144 at layer 2
    assert {"doc_id", "image_tokens", "flops_share", "kv_share"} <= set(written["samples"][0])


def test_bad_model_args_fail_before_any_request() -> None:
    with pytest.raises(PolicyError, match="fastv"):  # the closest policy name
        PolicycChat.create_from_arg_string("pretrained=default,policy=fastvv")
    with pytest.raises(PolicyError, match="name no policy"):
        PolicycChat.create_from_arg_string("pretrained=default,ratio=25%")
    with pytest.raises(PolicyError, match="bfloat16"):
        PolicycChat.create_from_arg_string("pretrained=default,dtype=bfloat61")
    with pytest.raises(PolicyError, match="is not a JSON object"):
        PolicycChat.create_from_arg_string('pretrained=default,policy=fastv,params={"ratio":25%}')
    with pytest.raises(PolicyError, match="did you mean 'ratio'"):
        PolicycChat.create_from_arg_string("pretrained=default,policy=fastv,ratoi=25%")


def test_the_readme_command_line_runs_offline(tmp_path: Path, bundled: tuple[Any, Any],
                                               reference: dict[str, Evaluation]) -> None:
    """`lmms-eval --model policyc ...` as the README writes it: lmms-eval's results and policyc's side JSON."""
    stats, out = tmp_path / "policyc_stats.json", tmp_path / "out"
    lmms_eval = Path(sys.executable).with_name("lmms-eval")
    command = [str(lmms_eval), "--model", "policyc", "--model_args",
               f"pretrained=default,policy=visionzip,stats_path={stats}", "--tasks", "policyc_synthetic",
               "--include_path", str(tasks_dir()), "--batch_size", "16", "--limit", "32", "--output_path", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.glob("*/*_results.json")  # lmms-eval exits 0 even when a run fails: its results file tells
    figures = json.loads(results.read_text())["results"]["policyc_synthetic"]
    expected = reference["visionzip"].predictions[:32]
    assert figures["exact_match,none"] == sum(p.exact for p in expected) / 32
    written = json.loads(stats.read_text())
    assert [s["image_tokens"] for s in sorted(written["samples"], key=lambda s: s["doc_id"])] == \
        [p.image_tokens for p in expected]


def test_policyc_eval_lmms_sweeps_and_plots(tmp_path: Path) -> None:
    plot, table = tmp_path / "retention.png", tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "fastv", "--lmms", "policyc_synthetic", "--limit", "16", "--sweep",
                                       "ratio=25%,50%", "--plot", str(plot), "--json", str(table)])
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = json.loads(table.read_text())["results"]
    assert [r["policy"] for r in rows] == ["unmodified", "fastv ratio=25%", "fastv ratio=50%"]
    assert [r["image_tokens_in_last_layer"] for r in rows] == [144, 36, 72]
    assert rows[0]["retention"] == 1.0 and all(r["samples"] == 16 for r in rows)


def test_policyc_eval_lmms_fails_loudly() -> None:
    result = CliRunner().invoke(main, ["eval", "fastv", "--lmms", "policyc_synthetc", "--limit", "4"])
    assert result.exit_code == 1 and "policyc_synthetic" in result.output  # the closest task
    result = CliRunner().invoke(main, ["eval", "fastv", "--lmms", "policyc_synthetic:accuracy", "--limit", "4"])
    assert result.exit_code == 1 and "exact_match" in result.output  # the task's metrics
    result = CliRunner().invoke(main, ["eval", "--lmms", "policyc_synthetic", "--data", "x.jsonl"])
    assert result.exit_code == 1 and "--data" in result.output


def test_policyc_search_lmms_computes_a_front(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["search", "fastv", "--lmms", "policyc_synthetic_val", "--trials", "2",
                                       "--limit", "8", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    trials = json.loads((tmp_path / "trials.json").read_text())
    assert len(trials["trials"]) == 2 and trials["pareto"]
    assert all(0 <= t["metrics"]["accuracy"] <= 1 and t["metrics"]["flops"] < 1 for t in trials["trials"])
    result = CliRunner().invoke(main, ["search", "fastv", "--lmms", "policyc_synthetic_val", "--objective",
                                       "vqa_score", "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and "vqa_score" in result.output


def test_another_family_gemma3_with_its_processor(tmp_path: Path, manager: Any) -> None:
    """A saved Gemma 3 (random weights, its real processor): DivPrune at the projector through lmms-eval answers as
    `policyc eval`'s batch function does, and keeps half of the 16 image tokens."""
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from tiny_gemma3 import PROCESSOR_IDS, PROCESSOR_VOCAB, gemma3_processor, tiny_gemma3

    directory = tmp_path / "gemma3"
    tiny_gemma3(vocab=PROCESSOR_VOCAB, ids=PROCESSOR_IDS).save_pretrained(directory)
    gemma3_processor().save_pretrained(directory)
    wrapper = PolicycChat.create_from_arg_string(f"pretrained={directory},policy=divprune,ratio=50%",
                                                 {"batch_size": 4})
    _, samples = lmms_run(wrapper, manager, limit=8, batch_size=4)
    assert {r["image_tokens"] for r in wrapper.records} == {8}
    expected = evaluate(wrapper.model, wrapper.processor, synthetic_items("test", 8), wrapper.compiled, "divprune",
                        batch_size=4)
    assert [normalize(response(s)) for s in samples] == [p.predicted for p in expected.predictions]


@pytest.mark.parametrize(("task", "metric"), [("mme", "mme_perception_score"), ("gqa", "exact_match"),
                                              ("textvqa_val", "exact_match")])
def test_the_readme_benchmarks_are_generation_tasks_this_model_answers(task: str, metric: str, manager: Any) -> None:
    """The README's MME, GQA and TextVQA commands name lmms-eval tasks that generate (the only kind the model
    answers) and the metric they report; their data cannot be downloaded here."""
    config = manager._get_config(task)
    assert config["output_type"] == "generate_until"
    assert metric in [m["metric"] for m in config["metric_list"]]


def test_a_task_whose_data_is_unreachable_fails_with_where_it_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    result = CliRunner().invoke(main, ["eval", "--lmms", "mme", "--limit", "2"])
    assert result.exit_code == 1
    assert "lmms-eval could not evaluate mme" in result.output and "lmms-lab-encoder/MME" in result.output


def test_a_video_request_is_refused_with_a_reason(bundled: tuple[Any, Any]) -> None:
    wrapper = PolicycChat("default", loaded=bundled)
    wrapper.task_dict = {"clips": {"test": [{"path": "clip.mp4"}]}}
    messages = [{"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "?"}]}]
    request = SimpleNamespace(args=("?", lambda doc: messages, {"max_new_tokens": 2}, 0, "clips", "test"))
    with pytest.raises(PolicyError, match="not videos yet"):
        wrapper.generate_until([request])


def test_the_fx_backend_answers_as_the_eager_one(manager: Any) -> None:
    """`backend=fx`: the LLM's prefill captured by torch.compile and rewritten by the graph passes."""
    runs = [lmms_run(PolicycChat.create_from_arg_string(f"pretrained=default,policy=fastv,ratio=25%,backend={b}"),
                     manager, limit=8, batch_size=8)[1] for b in ("eager", "fx")]
    assert [response(s) for s in runs[0]] == [response(s) for s in runs[1]]
