"""policyc's lmms-eval tasks without lmms-eval: the shipped documents are the generator's, scored as `policyc eval`
scores, and `--lmms` where lmms-eval is not installed fails with the install hint (tests/integrations/ run the tasks
through lmms-eval)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from click.testing import CliRunner

from policyc.cli import main
from policyc.integrations.lmms_eval import tasks_dir
from policyc.vqa.scenes import sample

TASK = tasks_dir() / "policyc_synthetic"


def utils() -> object:
    spec = importlib.util.spec_from_file_location("policyc_synthetic_utils", TASK / "utils.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_shipped_documents_are_the_generators() -> None:
    task = utils()
    for name, (split, count) in task.FILES.items():  # type: ignore[attr-defined]
        lines = [json.loads(line) for line in (TASK / name).read_text().splitlines()]
        assert lines == task.documents(split, count)  # type: ignore[attr-defined]
        assert len(lines) == count


def test_a_document_renders_its_scene_and_scores_as_policyc_eval() -> None:
    task = utils()
    doc = json.loads((TASK / "test.jsonl").read_text().splitlines()[0])
    (image,) = task.doc_to_visual(doc)  # type: ignore[attr-defined]
    assert image.tobytes() == sample("test", 0).scene.render().tobytes()
    assert task.doc_to_text(doc) == "what color is the triangle ?"  # type: ignore[attr-defined]
    assert task.process_results(doc, ["Green, surely"]) == {"exact_match": 1.0}  # type: ignore[attr-defined]
    assert task.process_results(doc, ["blue green"]) == {"exact_match": 0.0}  # type: ignore[attr-defined]


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed here")
def test_lmms_without_lmms_eval_names_the_extra() -> None:
    result = CliRunner().invoke(main, ["eval", "fastv", "--lmms", "policyc_synthetic", "--limit", "2"])
    assert result.exit_code == 1 and "pip install 'policyc[lmms]'" in result.output


@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is not None, reason="lmms-eval is installed here")
def test_search_lmms_without_lmms_eval_names_the_extra(tmp_path: object) -> None:
    result = CliRunner().invoke(main, ["search", "fastv", "--lmms", "policyc_synthetic_val", "--trials", "1",
                                       "-o", str(tmp_path)])
    assert result.exit_code == 1 and "pip install 'policyc[lmms]'" in result.output
