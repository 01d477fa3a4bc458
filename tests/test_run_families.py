"""`policyc run DIR POLICY` end to end on saved Idefics3, SmolVLM and Gemma 3 directories holding their real
processors (built offline: the PIL image processors and policyc:random's byte-level tokenizer with each family's
markers added), as tests/test_llava_next.py does for LLaVA-NeXT: the example image through the processor and its
chat template, the answer, the tokens kept per stage, a projector policy and `--show-tokens`.

InternVL, Qwen2-VL, Qwen3-VL, LLaVA-OneVision and SmolVLM's own processors take a video processor, which needs
torchvision (not a dependency): tests/integrations/test_processors.py runs them in the integrations venv, which has it;
without torchvision, `policyc run` on such a directory is tested here to name it."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import transformers
from click.testing import CliRunner
from tiny_gemma3 import PROCESSOR_IDS, PROCESSOR_VOCAB, gemma3_processor, tiny_gemma3
from tiny_idefics3 import PROCESSOR_IMAGE_ID, idefics3_processor, tiny_idefics3
from tiny_idefics3 import PROCESSOR_VOCAB as IDEFICS3_VOCAB
from tiny_internvl import tiny_internvl

from policyc.cli import main
from policyc.models.random_tiny import chat_template, random_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def run(*args: str) -> str:
    """`policyc run ARGS`'s standard output; the run must succeed."""
    result = CliRunner().invoke(main, ["run", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def kept_row(output: str, stage: str) -> tuple[int, int]:
    """(image tokens in, kept) of `stage`'s row in the table of tokens kept per stage."""
    row = next(line for line in output.splitlines() if line.lstrip("│ ").startswith(stage))
    cells = [cell.strip() for cell in row.strip("│ ").split("│")]
    return int(cells[3]), int(cells[4])


def assert_runs(directory: Path, image_tokens: int, tmp_path: Path) -> None:
    """FastV (50% at LLM layer 1) and DivPrune (50% at the projector, with `--show-tokens`) on `directory`: each prints
    its answer and keeps half of the prompt's `image_tokens`."""
    output = run(str(directory), "fastv", "--max-new-tokens", "3")
    assert re.search(r"output \(3 tokens\): '", output) and "tokens kept per stage" in output
    assert kept_row(output, "llm.layer[layer]") == (image_tokens, image_tokens // 2)
    picture = tmp_path / "tokens.png"
    output = run(str(directory), "divprune", "--param", "ratio=50%", "--max-new-tokens", "2", "--show-tokens",
                 str(picture))
    assert kept_row(output, "projector.output") == (image_tokens, image_tokens // 2)
    assert "wrote" in output and picture.read_bytes()[:8] == PNG


def _idefics3_processor_loads() -> bool:
    """Whether AutoProcessor can load a saved Idefics3 image processor here: transformers 5.17's import table marks
    even Idefics3ImageProcessorPil as needing torchvision (the class itself does not)."""
    try:
        transformers.Idefics3ImageProcessorPil()
    except (ImportError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not _idefics3_processor_loads(), reason=f"transformers {transformers.__version__} cannot load "
                    "an Idefics3 image processor without torchvision")
@pytest.mark.parametrize("smolvlm", [False, True], ids=["idefics3", "smolvlm"])
def test_policyc_run_on_a_saved_idefics3_with_its_processor(smolvlm: bool, tmp_path: Path) -> None:
    """The 96x96 example image resized to 64x64: 2x2 tiles and the global view, 4 `<image>` tokens each. SmolVLM's
    own processor needs a video processor (torchvision), so its directory holds an Idefics3Processor, which writes an
    image's prompt as SmolVLMProcessor does."""
    directory, processor = tmp_path / "model", idefics3_processor()
    assert processor.image_token_id == PROCESSOR_IMAGE_ID and len(processor.tokenizer) <= IDEFICS3_VOCAB
    tiny_idefics3(smolvlm=smolvlm, vocab=IDEFICS3_VOCAB, image_id=PROCESSOR_IMAGE_ID).save_pretrained(directory)
    processor.save_pretrained(directory)
    assert_runs(directory, 5 * 4, tmp_path)


def test_policyc_run_on_a_saved_gemma3_with_its_processor(tmp_path: Path) -> None:
    """The example image resized to 32x32, framed by `<start_of_image>` / `<end_of_image>`: 16 image tokens."""
    directory, processor = tmp_path / "model", gemma3_processor()
    tokenizer = processor.tokenizer
    assert (tokenizer.image_token_id, tokenizer.boi_token_id, tokenizer.eoi_token_id) == PROCESSOR_IDS
    assert len(tokenizer) <= PROCESSOR_VOCAB
    tiny_gemma3(vocab=PROCESSOR_VOCAB, ids=PROCESSOR_IDS).save_pretrained(directory)
    processor.save_pretrained(directory)
    assert_runs(directory, 16, tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_policyc_run_names_torchvision_for_an_internvl_directory(tmp_path: Path) -> None:
    """An InternVL directory laid out as the hub's `-hf` ones (InternVLProcessor, a GotOcr2 image processor, a
    tokenizer naming `<img>`, `</img>`, `<IMG_CONTEXT>`): its processor takes a video processor, so without torchvision
    `policyc run` stops with a clear error that names it."""
    directory = tmp_path / "model"
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}  # ids 260..263
    tiny_internvl(vocab=272, image_id=262).save_pretrained(directory)
    random_tokenizer(list(named.values()), named, chat_template("<IMG_CONTEXT>")).save_pretrained(directory)
    transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    (directory / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                                 "image_seq_length": 16}))
    result = CliRunner().invoke(main, ["run", str(directory), "fastv"])
    assert result.exit_code == 1
    assert "cannot load a processor" in result.stderr and "pip install torchvision" in result.stderr
