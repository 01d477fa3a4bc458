"""Compile artifacts (`policyc compile MODEL POLICY -o DIR`, `policyc.load(DIR)`) and the compile report."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc.artifact import embedded_policy_text, read_artifact, write_artifact
from policyc.cli import main
from policyc.errors import PolicyError
from policyc.lang import check_path
from policyc.lang.build import parse_value
from policyc.models import adapt
from policyc.report import measure, prefill_flops
from policyc.runtime import compile_model

ROOT = Path(__file__).parent.parent


def _greedy(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=6, do_sample=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LLaVA written by save_pretrained (a local model directory)."""
    directory = tmp_path_factory.mktemp("model") / "tiny"
    tiny_llava_clip(seed=3).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def artifact(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("artifact") / "fastv"
    result = CliRunner().invoke(main, ["compile", str(saved), "fastv", "--param", "ratio=25%", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "expected prefill speedup" in result.stdout and f"wrote {out}" in result.stdout
    return out


def test_artifact_records_policy_model_versions_and_report(artifact: Path, saved: Path) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["policy"]["name"] == "fastv" and manifest["params"] == {"ratio": "25%"}
    assert manifest["model"]["ref"] == str(saved.resolve())
    assert set(manifest["versions"]) == {"policyc", "torch", "transformers"}
    assert manifest["versions"]["torch"] == torch.__version__
    assert not list(artifact.glob("*.safetensors")) and not list(artifact.glob("*.bin"))  # no weights
    assert (artifact / "policy.tokpol").read_text() == embedded_policy_text(policyc.parse("fastv"))
    report = json.loads((artifact / "report.json").read_text())
    assert report["kept"][0]["before"] == 16 and report["kept"][0]["after"] == 4
    assert report["expected_prefill_speedup"] > 1


def test_round_trip_generates_what_compiling_directly_does(artifact: Path, saved: Path) -> None:
    model, _ = policyc.models.load_model(str(saved))
    inputs = make_inputs(model, seed=5)
    direct = compile_model(model, "fastv", {"ratio": parse_value("25%")})
    expected = _greedy(model, inputs)

    loaded = policyc.load(artifact)
    assert torch.equal(_greedy(loaded, inputs), expected)
    assert torch.equal(loaded.policyc.kept_positions, direct.kept_positions)
    given = policyc.load(artifact, model=tiny_llava_clip(seed=3))
    assert torch.equal(_greedy(given, inputs), expected)
    assert given.policyc_artifact.policy_name == "fastv"


def test_loading_onto_a_different_model_names_what_differs(artifact: Path) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.load(artifact, model=tiny_llava_clip(seed=3, num_llm_layers=3))
    message = str(error.value)
    assert "the model does not match the artifact" in message
    assert "text_config.num_hidden_layers: 3 here, 4 in the artifact" in message
    assert "policyc compile MODEL POLICY -o DIR" in message


def _copy(artifact: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    target.mkdir()
    for file in artifact.iterdir():
        (target / file.name).write_text(file.read_text())
    return target


@pytest.mark.parametrize(("damage", "message"), [
    (lambda d: (d / "manifest.json").write_text("{not json"), r"manifest.json is not valid JSON \(line 1"),
    (lambda d: (d / "policy.tokpol").write_text((d / "policy.tokpol").read_text().replace("50%", "60%")),
     "policy.tokpol does not match the sha256 in manifest.json"),
    (lambda d: (d / "policy.tokpol").write_text((d / "policy.tokpol").read_text()[:40]),  # truncated
     "policy.tokpol does not match the sha256 in manifest.json"),
    (lambda d: (d / "report.json").unlink(), "report.json is missing"),
    (lambda d: (d / "manifest.json").write_text((d / "manifest.json").read_text().replace('"25%"', '"30%"')),
     "manifest.json does not match its own sha256"),
    (lambda d: (d / "manifest.json").write_text('{"format": "other"}'), "is not a policyc artifact manifest"),
    (lambda d: (d / "manifest.json").unlink(), "is no policyc artifact: it has no manifest.json"),
])
def test_damaged_artifacts_fail_clearly(artifact: Path, tmp_path: Path, damage: object, message: str) -> None:
    copy = _copy(artifact, tmp_path)
    damage(copy)  # type: ignore[operator]
    with pytest.raises(PolicyError, match=message):
        policyc.load(copy, model=tiny_llava_clip(seed=3))
    result = CliRunner().invoke(main, ["run", str(copy)])
    assert result.exit_code == 1


def test_no_artifact_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such directory"):
        read_artifact(tmp_path / "missing")


def test_writing_into_a_directory_with_other_files_is_refused(saved: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["compile", str(saved), "fastv", "-o", str(tmp_path)])
    assert result.exit_code == 1 and "holds other files" in result.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_compile_needs_emit_or_output(saved: Path) -> None:
    assert CliRunner().invoke(main, ["compile", str(saved), "fastv"]).exit_code == 2


def test_unknown_hub_id_offline_fails_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "policyc.cli", "compile", "policyc-test/no-such-model", "fastv",
                             "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1, result.stderr
    assert "cannot load model 'policyc-test/no-such-model': it is not in the local Hugging Face cache" in result.stderr
    assert not (tmp_path / "out").exists()


def test_embedded_policy_is_self_contained() -> None:
    """A policy that uses another through an import alias becomes one file with the same stages."""
    checked = next(c for c in check_path(ROOT / "tests" / "data" / "imports" / "main.tokpol")
                   if c.program.policy.name == "by_alias")
    text = embedded_policy_text(checked)
    assert "import" not in text and "use shared_prune" in text and "policy shared_prune" in text
    again = policyc.parse(text, name="by_alias")
    assert [s.placed.stage for s in again.stages] == [s.placed.stage for s in checked.stages]
    composed = embedded_policy_text(policyc.parse("pyramiddrop_snapkv"))
    assert re.findall(r"^policy (\w+)", composed, re.MULTILINE) == ["pyramiddrop_snapkv", "pyramiddrop", "snapkv"]


def _hand_count_layer(n: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inner: int, gated: bool) -> int:
    projections = n * hidden * (2 * heads * head_dim + 2 * kv_heads * head_dim)  # q, o; k, v
    mlp = n * hidden * inner * (3 if gated else 2)
    scores = 2 * n * n * heads * head_dim  # QK^T and AV
    return 2 * (projections + mlp + scores)


def test_report_flops_match_a_hand_count() -> None:
    """tiny_llava_clip: CLIP 3 layers (hidden 32, MLP 64, 4 heads x 8) on 17 tokens, projector 32->64->64 on
    16 tokens, Llama 4 layers (hidden 64, MLP 128 gated, 4 heads x 16, 2 kv heads)."""
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    length = inputs["input_ids"].shape[1]  # 3 + 16 + 4
    compiled = compile_model(model, "fastv", {"ratio": parse_value("25%")})
    report = measure(compiled, inputs, "tiny")
    encoder = 3 * _hand_count_layer(17, 32, 4, 4, 8, 64, gated=False)
    projector = 2 * 16 * (32 * 64 + 64 * 64)
    llm = [_hand_count_layer(n, 64, 4, 2, 16, 128, gated=True) for n in (length, length, length - 12, length - 12)]
    assert report.flops_before.encoder == report.flops_after.encoder == encoder
    assert report.flops_before.projector == projector
    assert report.flops_before.llm == 4 * llm[0]
    assert report.flops_after.llm == sum(llm)
    assert report.speedup == pytest.approx((encoder + projector + 4 * llm[0]) / (encoder + projector + sum(llm)))
    assert report.llm_tokens_per_layer == [length, length, length - 12, length - 12]
    assert [(k.layer, k.before, k.after, len(k.kept_patches)) for k in report.kept] == [(1, 16, 4, 4)]
    kept_image = sorted(p - 3 for p in compiled.kept_positions[0].tolist() if 3 <= p < 19)  # image at 3..18
    assert list(report.kept[0].kept_patches) == kept_image  # "default" strategy: token j is patch j
    assert prefill_flops(adapt(tiny_llava_clip()), [length] * 4, batch=2).total == 2 * report.flops_before.total


def test_loading_an_artifact_of_an_uncached_hub_model_offline_fails_clearly(tmp_path: Path) -> None:
    out = tmp_path / "artifact"
    write_artifact(out, policyc.parse("fastv"), tiny_llava_clip(), "policyc-test/no-such-model", {}, {})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = f"import policyc\npolicyc.load({str(out)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 1
    assert "cannot load model 'policyc-test/no-such-model': it is not in the local Hugging Face cache" in result.stderr
