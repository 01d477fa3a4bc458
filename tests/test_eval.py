"""`policyc eval` and policyc.evaluation: JSONL and synthetic data, exact-match and VQA scoring, retention
against the unmodified model, per-prompt image tokens and FLOPs share, clear errors for bad data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from policyc.cli import main
from policyc.errors import PolicyError
from policyc.evaluation import Item, Prediction, evaluate, jsonl_items, load_items, retention
from policyc.lang import check_source
from policyc.models.random_tiny import random_model, random_processor
from policyc.runtime import compile_model
from policyc.vqa.scenes import samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic scenes as PNG files and a JSONL whose answers are placeholders."""
    folder = tmp_path_factory.mktemp("data")
    lines = []
    for index, item in enumerate(samples("validation", 6)):
        item.scene.render().save(folder / f"{index}.png")
        lines.append(json.dumps({"image": f"{index}.png", "question": item.question, "answer": item.answer}))
    (folder / "data.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "data.jsonl"


def test_identity_policy_keeps_every_answer_and_costs_nothing(dataset: Path) -> None:
    model, processor = random_model(banner=False), random_processor()
    items = jsonl_items(dataset)
    plain = evaluate(model, processor, items, batch_size=4)
    # answers the unmodified model gives become the reference: its accuracy is then exactly 1
    own = [Item(i.image, i.question, (p.predicted,)) for i, p in zip(items, plain.predictions, strict=True)]
    base = evaluate(model, processor, own, batch_size=4)
    assert base.accuracy == 1.0 and base.flops_share == 1.0 and base.image_tokens == 64
    identity = check_source(
        "policy keep_all { stage llm.layer[1] { keep top 100% of vision by attention(last -> vision) } }")[0]
    compiled = compile_model(model, identity)
    try:
        same = evaluate(model, processor, own, compiled, "keep_all", batch_size=4)
    finally:
        compiled.remove()
    assert [p.predicted for p in same.predictions] == [p.predicted for p in base.predictions]
    assert retention(same, base) == 1.0 and same.flops_share == 1.0 and same.image_tokens == 64


def test_a_pruning_policy_reports_tokens_and_flops_per_prompt(dataset: Path) -> None:
    model, processor = random_model(banner=False), random_processor()
    compiled = compile_model(model, "fastv")
    try:
        result = evaluate(model, processor, jsonl_items(dataset), compiled, "fastv", batch_size=4)
    finally:
        compiled.remove()
    assert [p.image_tokens for p in result.predictions] == [32] * 6  # 50% of 64, every prompt
    assert all(0.5 < p.flops_share < 1.0 for p in result.predictions)
    assert result.flops_share == pytest.approx(sum(p.flops_share for p in result.predictions) / 6)


def test_vqa_score_counts_matching_answers() -> None:
    item = Item(None, "q", ("red", "red", "blue", "red"))  # type: ignore[arg-type]
    assert Prediction(item, "red", 1.0, 1).vqa == 1.0 and Prediction(item, "blue", 1.0, 1).vqa == pytest.approx(1 / 3)
    assert Prediction(item, "blue", 1.0, 1).exact == 0.0


@pytest.mark.parametrize(("line", "message"), [
    ("{not json", "not JSON"),
    ('{"image": "0.png", "question": "q"}', 'needs "image", "question" and "answer"'),
    ('{"image": "0.png", "question": "q", "answer": []}', "non-empty list of strings"),
    ('{"image": "missing.png", "question": "q", "answer": "a"}', "cannot read the image"),
])
def test_bad_data_fails_with_its_line(tmp_path: Path, dataset: Path, line: str, message: str) -> None:
    (tmp_path / "0.png").write_bytes((dataset.parent / "0.png").read_bytes())
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"image": "0.png", "question": "q", "answer": "a"}) + "\n" + line + "\n")
    with pytest.raises(PolicyError, match=message) as caught:
        jsonl_items(bad)
    assert f"{bad}:2" in str(caught.value)
    with pytest.raises(PolicyError, match="unknown data set"):
        load_items(str(tmp_path / "data.csv"))


def test_cli_eval_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(main, ["eval", "fastv", "--limit", "5", "--batch-size", "5", "--param", "ratio=25%",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]] == ["unmodified", "fastv"]
    unmodified, fastv = report["results"]
    assert unmodified["samples"] == fastv["samples"] == 5 and unmodified["flops_share"] == 1.0
    assert fastv["image_tokens_in_last_layer"] == 36 and fastv["flops_share"] < 1.0
    assert set(fastv["accuracy_by_kind"]) == {"color", "shape", "count", "exists", "left"}
    assert "accuracy on synthetic (test)" in result.output
    assert 0.0 <= fastv["accuracy"] <= 1.0


def test_cli_eval_sweeps_a_parameter_and_plots(tmp_path: Path) -> None:
    out, picture = tmp_path / "eval.json", tmp_path / "sweep.png"
    result = CliRunner().invoke(main, ["eval", "fastv", "--limit", "3", "--batch-size", "3",
                                       "--sweep", "ratio=25%,50%", "--plot", str(picture), "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [r["policy"] for r in report["results"]] == ["unmodified", "fastv ratio=25%", "fastv ratio=50%"]
    assert [r["image_tokens_in_last_layer"] for r in report["results"]] == [144, 36, 72]  # of 144
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(main, ["eval", "fastv", "--sweep", "ratio"])
    assert bad.exit_code == 2 and "--sweep takes NAME=V1,V2" in bad.output
