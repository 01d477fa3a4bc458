"""`policyc run` on the embedded models (the trained default, the random one), a local model directory and an
artifact; `--show-tokens`; the embedded models, their processors, and loading the trained model's directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from policyc.cli import main
from policyc.errors import PolicyError
from policyc.models import adapt, bundled
from policyc.models.bundled import DEFAULT_NAME, RANDOM_NAME, example_image_path, load_reference_model
from policyc.models.random_tiny import random_model, random_processor
from policyc.run import Target, generate_timed, prompt_inputs, resolve_target


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 50x40 RGB image (not the processor's size: it resizes and crops)."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 50, 3), generator=generator, dtype=torch.uint8)
    path = tmp_path_factory.mktemp("image") / "noise.png"
    Image.frombytes("RGB", (50, 40), bytes(pixels.flatten().tolist())).save(path)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_random_model_is_deterministic_and_processes_a_real_image(image: Path) -> None:
    first, second = random_model(banner=False), random_model(banner=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))
    adapter = adapt(first)
    assert adapter.tokens_per_image == 64 and adapter.patch_grid == (8, 8) and len(adapter.decoder_layers) == 32
    inputs = prompt_inputs(random_processor(), image, "What is this?", "cpu", torch.float32)
    assert inputs["pixel_values"].shape == (1, 3, 64, 64)
    assert int((inputs["input_ids"] == adapter.image_token_id).sum()) == 64
    tokens, timings = generate_timed(first, inputs, 4)
    assert tokens.shape == (1, timings.new_tokens) and 1 <= timings.new_tokens <= 4


def test_random_models_tokenizer_round_trips_bytes() -> None:
    tokenizer = random_processor().tokenizer
    text = "Größe: naïve café 🙂 <image>!"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.convert_tokens_to_ids("<image>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_run_fastv_on_the_random_model(image: Path) -> None:
    code, out, err = invoke("run", "random", "fastv", "--image", str(image), "--prompt", "Where is the sun?",
                            "--max-new-tokens", "3")
    assert code == 0, err
    assert "RANDOM weights" in err
    assert "tokens kept per stage" in out and "timings" in out and "expected prefill speedup" in out
    row = next(line for line in out.splitlines() if "llm.layer[layer]" in line)
    assert row.split("│")[3:6] == [" 1     ", " 64              ", " 32   "]  # fastv: 50% of 64 after layer 1


def test_run_with_no_arguments_answers_the_example_question() -> None:
    """The trained embedded model answers the example question about the shipped scene (a green triangle)."""
    assert example_image_path().is_file()
    code, out, err = invoke("run")
    assert code == 0, err
    assert "no policy: the model ran unchanged" in out and "RANDOM" not in err
    assert "output (2 tokens): 'green'" in out


def test_run_with_an_empty_question() -> None:
    """An empty prompt leaves no text after the image: FastV's last-row signal still ranks, and it generates."""
    code, out, err = invoke("run", "fastv", "--prompt", "", "--max-new-tokens", "2")
    assert code == 0, err
    assert " 72   " in next(x for x in out.splitlines() if "llm.layer[layer]" in x)  # the default 50% of 144


def test_run_fastv_on_the_default_model() -> None:
    code, out, err = invoke("run", "fastv", "--param", "ratio=25%")
    assert code == 0, err
    assert " 36   " in next(x for x in out.splitlines() if "llm.layer[layer]" in x)  # 25% of 144


def test_the_trained_model_loads_from_its_package_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`policyc:default` is a save_pretrained directory loaded with from_pretrained; without weights it fails
    clearly."""
    from transformers import LlavaForConditionalGeneration

    from policyc.vqa.model import vqa_config, vqa_processor

    monkeypatch.setattr(bundled, "bundled_model_dir", lambda: tmp_path / "vqa")
    code, _, err = invoke("run", "default", "fastv")
    assert code == 1 and "the embedded model policyc:default has no weights in" in err
    torch.manual_seed(0)
    LlavaForConditionalGeneration._from_config(vqa_config()).save_pretrained(tmp_path / "vqa")
    vqa_processor().save_pretrained(tmp_path / "vqa")
    model = load_reference_model(DEFAULT_NAME)
    assert adapt(model).tokens_per_image == 144 and len(adapt(model).decoder_layers) == 8
    code, out, err = invoke("run", "fastv", "--max-new-tokens", "2")
    assert code == 0, err
    assert " 72   " in next(x for x in out.splitlines() if "llm.layer[layer]" in x)  # 50% of 144


def test_show_tokens_writes_a_png(image: Path, tmp_path: Path) -> None:
    target, policy = tmp_path / "kept.png", tmp_path / "two.tokpol"
    policy.write_text("policy two {\n  stage llm.layer[2, 5] {\n    keep top 50% of vision by attention(last -> vision)"
                      "\n  }\n}\n")
    code, out, err = invoke("run", "random", str(policy), "--image", str(image), "--max-new-tokens", "2",
                            "--show-tokens", str(target))
    assert code == 0, err
    with Image.open(target) as drawn:
        assert drawn.format == "PNG" and drawn.width == 900  # 3 panels of 3 inches at 100 dpi: input, 2 layers
    assert [line.split("│")[4:6] for line in out.splitlines() if "llm.layer[2, 5]" in line] == [
        [" 64              ", " 32   "], [" 32              ", " 16   "]]
    assert f"wrote {target}" in out


def test_run_a_local_directory_and_an_artifact_of_it(tmp_path: Path) -> None:
    model_dir, artifact = tmp_path / "model", tmp_path / "artifact"
    random_model(banner=False).save_pretrained(model_dir)
    random_processor().save_pretrained(model_dir)
    code, out, err = invoke("run", str(model_dir), "fastv", "--param", "ratio=25%", "--max-new-tokens", "2")
    assert code == 0, err
    assert " 16   " in next(line for line in out.splitlines() if "llm.layer[layer]" in line)
    assert "RANDOM" not in err  # a directory is not the random embedded model
    assert invoke("compile", str(model_dir), "fastv", "--param", "ratio=25%", "-o", str(artifact))[0] == 0
    code, out_artifact, err = invoke("run", str(artifact), "--max-new-tokens", "2")
    assert code == 0, err
    assert out_artifact.split("tokens kept per stage")[0] == out.split("tokens kept per stage")[0]  # same text


def test_run_errors(tmp_path: Path) -> None:
    model_dir = tmp_path / "bare"
    random_model(banner=False).save_pretrained(model_dir)  # no processor files
    code, _, err = invoke("run", str(model_dir), "fastv")
    assert code == 1 and f"cannot load a processor (image processor and tokenizer) for '{model_dir}'" in err
    code, _, err = invoke("run", "fastv", "--show-tokens", str(tmp_path / "x.png"), "--param", "ratoi=1%")
    assert code == 1 and "did you mean 'ratio'" in err
    code, _, err = invoke("run", "--param", "ratio=25%")
    assert code == 1 and "--param needs a POLICY" in err
    assert invoke("run", "fastv", "--image", str(tmp_path / "missing.png"))[0] == 2


def test_resolve_target(tmp_path: Path) -> None:
    assert resolve_target(None, None) == Target(DEFAULT_NAME)
    assert resolve_target("fastv", None) == Target(DEFAULT_NAME, "fastv")
    assert resolve_target("default", "fastv") == Target(DEFAULT_NAME, "fastv")
    assert resolve_target("random", None) == Target(RANDOM_NAME)
    assert resolve_target("org/model", None) == Target("org/model")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(PolicyError, match="already holds its policy"):
        resolve_target(str(tmp_path), "fastv")
