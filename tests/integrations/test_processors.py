"""`policyc run` and `policyc eval` on saved Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5, GLM-4.1V, Mistral 3,
LLaVA-OneVision, InternVL and SmolVLM directories holding their real processors (issue 23). Most of these processors
take a video processor, which needs torchvision, so they run in the integrations venv (scripts/integrations-venv.sh: a
CUDA build of torch running on the CPU, with its torchvision); elsewhere this module skips, and
tests/test_run_families.py checks that `policyc run` names torchvision instead.

Each directory holds a tiny random model and its family's processor built offline: the family's image and video
processors at the tiny model's sizes and policyc:random's byte-level tokenizer with the family's markers added (the
model's vocabulary and marker ids refitted to it). The checks: the example image through the processor and its chat
template, the tokens each stage kept, `--show-tokens`, `policyc eval`'s image tokens, and left-padded batches of
prompts with images of different sizes answering as each prompt alone, unmodified and under an LLM-stage and a
projector-stage policy. (LLaVA-OneVision-1.5 has no processor of its own in transformers: not here.)
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("POLICYC_REQUIRE_INTEGRATIONS") != "1" and importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is not installed (see scripts/integrations-venv.sh)", allow_module_level=True)

import transformers
from click.testing import CliRunner
from PIL import Image
from test_run_families import kept_row, run
from tiny_glm4v import tiny_glm4v
from tiny_idefics3 import PROCESSOR_IMAGE_ID, PROCESSOR_TOKENS, PROCESSOR_VOCAB, SIZE, TOKENS_PER_TILE, tiny_idefics3
from tiny_internvl import tiny_internvl
from tiny_llava_next import image_processor, tiny_anyres
from tiny_mistral3 import tiny_mistral3
from tiny_models import tiny_qwen2_vl
from tiny_qwen3_5 import tiny_qwen3_5
from tiny_qwen3_vl import tiny_qwen3_vl

import policyc
from policyc.cli import main
from policyc.evaluation import answer_batch, prompt_text
from policyc.models.bundled import example_image_path
from policyc.models.random_tiny import CHAT_TEMPLATE, chat_template, random_tokenizer
from policyc.report import report_from_last_prefill

PNG = b"\x89PNG\r\n\x1a\n"
VOCAB = 272  # policyc:random's tokenizer (260 ids) and a family's markers, rounded up

# Qwen's markers as the tokenizer names them; ids 260..263 in random_tokenizer's order
QWEN_TOKENS = {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>",
               "image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
QWEN_IDS = (262, 263, 260, 261)  # image, video, vision start, vision end, as the tiny Qwen builders take them
QWEN_PIXELS = {"shortest_edge": 16 * 16, "longest_edge": 64 * 32}  # a 32x32 image: 16 tokens; 64x32: 32


def refit(model: Any, **ids: int) -> Any:
    """`model` (a tiny test model of vocabulary 128) with VOCAB embedding rows and its marker ids set in its config
    to the processor tokenizer's."""
    model.resize_token_embeddings(VOCAB)
    for name, value in ids.items():
        setattr(model.config, name, value)
    return model


def qwen(version: str) -> tuple[Any, Any]:
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 and its processor: Qwen2-VL's image processor (4x4 patches,
    2x2 merge, at most 64x32 pixels), the family's video processor, `<|vision_start|><|image_pad|><|vision_end|>`
    for an image in the chat template (Qwen3.5's checkpoints name Qwen3-VL's processor)."""
    tokenizer = random_tokenizer(list(QWEN_TOKENS.values()), QWEN_TOKENS,
                                 chat_template("<|vision_start|><|image_pad|><|vision_end|>"))
    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "size": QWEN_PIXELS}
    images = transformers.Qwen2VLImageProcessor(**sizes)
    if version in ("3", "3.5"):
        videos = transformers.Qwen3VLVideoProcessor(**sizes)
        processor_class: Any = transformers.Qwen3VLProcessor
        model = tiny_qwen3_vl(vocab=VOCAB, ids=QWEN_IDS) if version == "3" else refit(
            tiny_qwen3_5(), **dict(zip(("image_token_id", "video_token_id", "vision_start_token_id",
                                        "vision_end_token_id"), QWEN_IDS, strict=True)))
    else:
        videos = transformers.Qwen2VLVideoProcessor(**sizes)
        processor_class = transformers.Qwen2VLProcessor if version == "2" else transformers.Qwen2_5_VLProcessor
        model = tiny_qwen2_vl(version=version, vocab=VOCAB, ids=QWEN_IDS)
    processor = processor_class(image_processor=images, tokenizer=tokenizer, video_processor=videos,
                                chat_template=tokenizer.chat_template)
    return model, processor


def glm4v() -> tuple[Any, Any]:
    """A tiny GLM-4.1V and its processor (Glm4vProcessor: GLM's image and video processors at Qwen's tiny sizes),
    `<|begin_of_image|><|image|><|end_of_image|>` for an image in the chat template; ids 260..265."""
    markers = ["<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>",
               "<|end_of_video|>"]
    tokenizer = random_tokenizer(markers, {"image_token": "<|image|>", "video_token": "<|video|>"},
                                 chat_template("<|begin_of_image|><|image|><|end_of_image|>"))
    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "size": QWEN_PIXELS}
    processor = transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessorPil(**sizes), tokenizer=tokenizer,
        video_processor=transformers.Glm4vVideoProcessor(**sizes), chat_template=tokenizer.chat_template)
    names = ("image_start_token_id", "image_token_id", "image_end_token_id", "video_token_id",
             "video_start_token_id", "video_end_token_id")
    return refit(tiny_glm4v(), **dict(zip(names, range(260, 266), strict=True))), processor


def mistral3() -> tuple[Any, Any]:
    """A tiny Mistral 3 and its processor (PixtralProcessor: images resized to at most 64 pixels a side in multiples
    of 16, one `[IMG]` per 2x2 of 8-pixel patches, a `[IMG_BREAK]` after each row, `[IMG_END]` last; ids 260..262)."""
    markers = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer = random_tokenizer(markers, {"image_token": "[IMG]"}, chat_template("[IMG]"))
    images = transformers.PixtralImageProcessorPil(patch_size={"height": 16, "width": 16},
                                                   size={"longest_edge": 64})
    processor = transformers.PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8,
                                              spatial_merge_size=2, chat_template=tokenizer.chat_template)
    return refit(tiny_mistral3(), image_token_index=260), processor


def onevision() -> tuple[Any, Any]:
    """A tiny LLaVA-OneVision (SigLIP, anyres_max_2) and its processor: 16 base tokens per 32x32 view."""
    tokenizer = random_tokenizer(["<video>"], {"video_token": "<video>"}, CHAT_TEMPLATE)
    videos = transformers.LlavaOnevisionVideoProcessor(size={"height": 32, "width": 32})
    processor = transformers.LlavaOnevisionProcessor(
        image_processor=image_processor("llava_onevision"), tokenizer=tokenizer, video_processor=videos,
        num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_2",
        chat_template=CHAT_TEMPLATE)
    return tiny_anyres("llava_onevision", vocab=VOCAB, image_id=3), processor


def internvl() -> tuple[Any, Any]:
    """A tiny InternVL laid out as the hub's `-hf` directories: InternVLProcessor, a GotOcr2 image processor (one
    32x32 tile: 16 tokens) and a tokenizer naming `<img>`, `</img>`, `<IMG_CONTEXT>` (ids 260..262)."""
    named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tokenizer = random_tokenizer(list(named.values()), named, chat_template("<IMG_CONTEXT>"))
    processor = transformers.InternVLProcessor(
        image_processor=transformers.GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tokenizer,
        video_processor=transformers.InternVLVideoProcessor(size={"height": 32, "width": 32}), image_seq_length=16,
        chat_template=tokenizer.chat_template)
    return tiny_internvl(vocab=VOCAB, image_id=262), processor


def smolvlm() -> tuple[Any, Any]:
    """A tiny SmolVLM and its own processor (SmolVLMProcessor, which Idefics3's stands in for where torchvision is
    missing): images split into 32x32 tiles plus a global view, 4 tokens each."""
    tokenizer = random_tokenizer(PROCESSOR_TOKENS, None, chat_template())
    sizes = {"size": {"longest_edge": 2 * SIZE}, "max_image_size": {"longest_edge": SIZE}}
    processor = transformers.SmolVLMProcessor(
        image_processor=transformers.SmolVLMImageProcessorPil(**sizes), tokenizer=tokenizer,
        video_processor=transformers.SmolVLMVideoProcessor(**sizes), image_seq_len=TOKENS_PER_TILE,
        chat_template=chat_template())
    return tiny_idefics3(smolvlm=True, vocab=PROCESSOR_VOCAB, image_id=PROCESSOR_IMAGE_ID), processor


FAMILIES: dict[str, Callable[[], tuple[Any, Any]]] = {
    "qwen2_vl": lambda: qwen("2"), "qwen2_5_vl": lambda: qwen("2.5"), "qwen3_vl": lambda: qwen("3"),
    "qwen3_5": lambda: qwen("3.5"), "glm4v": glm4v, "mistral3": mistral3, "llava_onevision": onevision,
    "internvl": internvl, "smolvlm": smolvlm,
}


# FastV's parameters per family where its default layer (1) cannot hold it: Qwen3.5's layer 1 is a Gated DeltaNet
# layer (no attention), its first full-attention layer is 3
FASTV = {"qwen3_5": {"layer": "3"}}

Saved = tuple[str, Path, Any, Any]


@pytest.fixture(scope="module", params=list(FAMILIES))
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """(family, directory, model, processor): the family's tiny model and processor, saved as `save_pretrained`
    writes them."""
    model, processor = FAMILIES[request.param]()
    directory = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return request.param, directory, model, processor


def image_id(model: Any) -> int:
    """The id of the model's image placeholder (Mistral 3 names it `image_token_index`)."""
    config = model.config
    return getattr(config, "image_token_id", None) or config.image_token_index


def example_prompt(processor: Any) -> dict[str, Any]:
    """The processor's inputs for `policyc run`'s example image and question."""
    image = Image.open(example_image_path()).convert("RGB")
    return processor(images=[[image]], text=[prompt_text(processor, "what color is the triangle ?")],
                     return_tensors="pt")


def divprune_keeps(model: Any, processor: Any) -> tuple[int, int]:
    """(image tokens, kept) of DivPrune at 50% on the example prompt through policyc's Python API: half of each
    image's tokens, rounded per view, separators such as LLaVA-OneVision's newlines kept."""
    inputs = example_prompt(processor)
    policyc.compile(model, "divprune", ratio="50%")
    try:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        report = report_from_last_prefill(model.policyc, inputs["input_ids"], "divprune")
    finally:
        model.policyc.remove()
        del model.policyc
    return report.kept[0].before, report.kept[0].after


def test_policyc_run_takes_the_example_image_through_the_processor(saved: Saved, tmp_path: Path) -> None:
    """`policyc run DIR fastv` keeps half of the image tokens the family's processor wrote for the example image;
    `policyc run DIR divprune --show-tokens` keeps what the Python API keeps on the processor's inputs, and draws the
    kept tokens."""
    family, directory, model, processor = saved
    count = int((example_prompt(processor)["input_ids"] == image_id(model)).sum())
    fastv = [f"--param={name}={value}" for name, value in FASTV.get(family, {}).items()]
    output = run(str(directory), "fastv", *fastv, "--max-new-tokens", "3")
    assert "output (3 tokens): '" in output and kept_row(output, "llm.layer[layer]") == (count, count // 2)
    before, after = divprune_keeps(model, processor)
    assert before == count and count // 2 <= after < count
    picture = tmp_path / "tokens.png"
    output = run(str(directory), "divprune", "--param", "ratio=50%", "--max-new-tokens", "2", "--show-tokens",
                 str(picture))
    assert kept_row(output, "projector.output") == (count, after)
    assert "wrote" in output and picture.read_bytes()[:8] == PNG


def test_policyc_eval_counts_the_processors_image_tokens(saved: Saved, tmp_path: Path) -> None:
    """`policyc eval DIR divprune` on 4 synthetic questions in batches of 2: the unmodified model's LLM sees every
    image token the processor wrote, the policy what it keeps through the Python API."""
    _, directory, model, processor = saved
    result = CliRunner().invoke(main, ["eval", str(directory), "divprune", "--param", "ratio=50%", "--limit", "4",
                                       "--batch-size", "2", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    unmodified, divprune = json.loads((tmp_path / "eval.json").read_text())["results"]
    count, after = divprune_keeps(model, processor)  # the synthetic scenes have the example image's size
    assert (unmodified["samples"], divprune["samples"]) == (4, 4)
    assert (unmodified["image_tokens_in_last_layer"], divprune["image_tokens_in_last_layer"]) == (count, after)
    assert divprune["flops_share"] < 1.0


@pytest.mark.parametrize(("policy", "params"), [(None, {}), ("fastv", {"ratio": "100%"}), ("fastv", {}),
                                                ("divprune", {"ratio": "50%"})])
def test_padded_batches_from_the_processor_answer_as_each_prompt_alone(saved: Saved, policy: str | None,
                                                                      params: dict[str, str]) -> None:
    """Two prompts of different lengths about images of different sizes, left-padded together by the processor:
    each row answers as its prompt alone (unmodified, and with the policy compiled); FastV keeping every token answers
    as the unmodified model."""
    family, _, model, processor = saved
    identity = params.get("ratio") == "100%"
    params = params | FASTV.get(family, {}) if policy == "fastv" else params
    images = [[Image.new("RGB", (32, 32), "red")], [Image.new("RGB", (64, 32), "blue")]]
    prompts = [prompt_text(processor, "what color is it ?"), prompt_text(processor, "how many ?")]
    compiled = None
    if policy:
        policyc.compile(model, policy, **params)
        compiled = model.policyc
    try:
        batch = answer_batch(model, processor, images, prompts, compiled, max_new_tokens=4, do_sample=False)
        alone = [answer_batch(model, processor, [i], [p], compiled, max_new_tokens=4, do_sample=False)[0]
                 for i, p in zip(images, prompts, strict=True)]
    finally:
        if compiled is not None:
            model.policyc.remove()
            del model.policyc
    assert [a.text for a in batch] == [a.text for a in alone]
    assert [a.image_tokens for a in batch] == [a.image_tokens for a in alone]
    if identity:
        unmodified = answer_batch(model, processor, images, prompts, max_new_tokens=4, do_sample=False)
        assert [a.text for a in batch] == [a.text for a in unmodified]
