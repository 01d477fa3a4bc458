"""Sanity tests of the plain references in tests/reference (FastV, arXiv:2403.06764; random drop; ToMe's LLM
prompt)."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from reference.fastv import fastv_generate
from reference.random_drop import random_drop_generate
from reference.tome import tome_last_logits
from tiny_models import IMAGE_TOKEN_ID, image_tokens, make_inputs, tiny_llava_clip, tiny_llava_siglip
from transformers import LlavaForConditionalGeneration

NEW = 6
BUILDERS: dict[str, Callable[..., LlavaForConditionalGeneration]] = {
    "clip": tiny_llava_clip, "siglip": tiny_llava_siglip,
}


def hf_greedy(model: LlavaForConditionalGeneration, inputs: dict[str, torch.Tensor], new: int = NEW) -> torch.Tensor:
    """`model.generate` greedy new tokens, EOS disabled (the references always produce `new` tokens)."""
    config = copy.deepcopy(model.generation_config)
    config.eos_token_id, config.max_new_tokens, config.min_new_tokens, config.do_sample = None, new, None, False
    with torch.no_grad():
        out = model.generate(**inputs, generation_config=config)
    return out[:, inputs["input_ids"].shape[1]:]


def image_positions(inputs: dict[str, torch.Tensor], b: int) -> torch.Tensor:
    return (inputs["input_ids"][b] == IMAGE_TOKEN_ID).nonzero().flatten()


def unpadded_row(inputs: dict[str, torch.Tensor], b: int) -> tuple[dict[str, torch.Tensor], int]:
    """Row b alone with its padding stripped, and how many pads were stripped."""
    valid = inputs["attention_mask"][b].bool()
    ids = inputs["input_ids"][b, valid][None]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": inputs["pixel_values"][b:b + 1]}, int((~valid).sum())


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize(("layer", "keep"), [(0, 1.0), (1, 1.0), (2, 16), (3, 16)])
def test_fastv_keeping_everything_is_generate(arch: str, layer: int, keep: int | float) -> None:
    model = BUILDERS[arch]()
    inputs = make_inputs(model, batch=2, pad_left=2)
    tokens, kept = fastv_generate(model, **inputs, layer=layer, keep=keep, max_new_tokens=NEW)
    assert torch.equal(tokens, hf_greedy(model, inputs))
    for b in range(2):
        assert torch.equal(kept[b], image_positions(inputs, b))


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_random_drop_keeping_everything_is_generate(arch: str) -> None:
    model = BUILDERS[arch]()
    inputs = make_inputs(model, batch=2, pad_left=2)
    tokens, kept = random_drop_generate(model, **inputs, fraction=1.0, seed=3, max_new_tokens=NEW)
    assert torch.equal(tokens, hf_greedy(model, inputs))
    for b in range(2):
        assert torch.equal(kept[b], image_positions(inputs, b))


def test_fastv_after_the_last_layer_changes_nothing() -> None:
    """Dropping after the last decoder layer leaves the last token's logits, hence the output, unchanged."""
    model = tiny_llava_clip(seed=1)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=1)
    tokens, kept = fastv_generate(model, **inputs, layer=3, keep=0.25, max_new_tokens=NEW)
    assert torch.equal(tokens, hf_greedy(model, inputs))
    assert [len(k) for k in kept] == [4, 4]


@pytest.mark.parametrize("arch", sorted(BUILDERS))
@pytest.mark.parametrize("layer", [0, 1, 2])
def test_fastv_half_keeps_the_last_tokens_top_attention(arch: str, layer: int) -> None:
    """The kept set is the top half by HF's own eager attention: layer `layer`, last row, mean over heads."""
    model = BUILDERS[arch](seed=2)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=2)
    n_image = image_tokens(model)
    _, kept = fastv_generate(model, **inputs, layer=layer, keep=0.5, max_new_tokens=1)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    for b in range(2):
        positions = image_positions(inputs, b)
        scores = attentions[layer][b].mean(dim=0)[-1, positions]
        expected = torch.sort(positions[torch.topk(scores, int(n_image * 0.5)).indices]).values
        assert len(kept[b]) == n_image // 2
        assert torch.all(kept[b][1:] > kept[b][:-1])
        assert torch.equal(kept[b], expected)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.9])
def test_fractions_truncate(fraction: float) -> None:
    model = tiny_llava_siglip()
    inputs = make_inputs(model)
    count = int(16 * fraction)
    _, fastv_kept = fastv_generate(model, **inputs, layer=1, keep=fraction, max_new_tokens=0)
    _, random_kept = random_drop_generate(model, **inputs, fraction=fraction, seed=0, max_new_tokens=0)
    assert len(fastv_kept[0]) == len(random_kept[0]) == count


def test_half_drops_change_the_output_for_some_seed() -> None:
    fastv_changed, random_changed = [], []
    for seed in range(4):
        model = tiny_llava_clip(seed=seed)
        inputs = make_inputs(model, batch=2, pad_left=1, seed=seed)
        full = hf_greedy(model, inputs)
        fastv_tokens, _ = fastv_generate(model, **inputs, layer=0, keep=0.5, max_new_tokens=NEW)
        random_tokens, _ = random_drop_generate(model, **inputs, fraction=0.5, seed=seed, max_new_tokens=NEW)
        fastv_changed.append(not torch.equal(fastv_tokens, full))
        random_changed.append(not torch.equal(random_tokens, full))
    assert any(fastv_changed)
    assert any(random_changed)


def test_random_drop_follows_its_random_number_convention() -> None:
    """A fresh generator seeded with `seed` per image draws torch.rand(n_image); the top share is kept."""
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=3, pad_left=[0, 2, 1])
    _, kept = random_drop_generate(model, **inputs, fraction=0.5, seed=7, max_new_tokens=0)
    for b in range(3):
        draws = torch.rand(16, generator=torch.Generator().manual_seed(7))
        expected = torch.sort(image_positions(inputs, b)[torch.topk(draws, 8).indices]).values
        assert torch.equal(kept[b], expected)
        assert torch.all(kept[b][1:] > kept[b][:-1])


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_fastv_batch_with_left_padding_is_per_sample(arch: str) -> None:
    model = BUILDERS[arch](seed=5)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=5)
    tokens, kept = fastv_generate(model, **inputs, layer=1, keep=0.5, max_new_tokens=NEW)
    for b in range(2):
        alone, pads = unpadded_row(inputs, b)
        alone_tokens, alone_kept = fastv_generate(model, **alone, layer=1, keep=0.5, max_new_tokens=NEW)
        assert torch.equal(tokens[b], alone_tokens[0])
        assert torch.equal(kept[b], alone_kept[0] + pads)
    assert pads == 3


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_random_drop_batch_with_left_padding_is_per_sample(arch: str) -> None:
    """The padded first row draws the generator's first numbers, as a run of that row alone does."""
    model = BUILDERS[arch](seed=6)
    inputs = make_inputs(model, batch=2, pad_left=[3, 0], seed=6)
    tokens, kept = random_drop_generate(model, **inputs, fraction=0.5, seed=11, max_new_tokens=NEW)
    alone, pads = unpadded_row(inputs, 0)
    alone_tokens, alone_kept = random_drop_generate(model, **alone, fraction=0.5, seed=11, max_new_tokens=NEW)
    assert pads == 3
    assert torch.equal(tokens[0], alone_tokens[0])
    assert torch.equal(kept[0], alone_kept[0] + pads)


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("order", ["spatial", "code"])
def test_tome_merging_nothing_is_the_unmodified_model(arch: str, order: str) -> None:
    """With r=0 the ToMe reference's prompt (its tokens in either order) gives the unmodified model's logits."""
    model = BUILDERS[arch]()
    inputs = make_inputs(model, batch=2, seed=3)
    with torch.no_grad():
        expected = model(**inputs).logits[:, -1]
    torch.testing.assert_close(tome_last_logits(model, inputs, 0, order), expected, atol=2e-5, rtol=1e-5)
