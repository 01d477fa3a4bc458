"""Multi-image test cases shared by tests/test_multi_image.py and tests/test_image_sets.py: per family a tiny model
with several images (or tiles) per prompt, their sizes in prompt order, and the comparison of a compiled policy with
the plain reference tests/reference/multi_image.py (kept tokens, generated tokens, first-step logits)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from reference.multi_image import generate
from tiny_idefics3 import make_idefics3_inputs, tiny_idefics3
from tiny_internvl import make_internvl_inputs, tiny_internvl
from tiny_models import QWEN_IMAGE_ID, QWEN_MERGE, make_inputs, make_qwen_inputs, tiny_llava_clip, tiny_qwen2_vl

import policyc
from policyc.models import adapt

Inputs = dict[str, torch.Tensor]
GRIDS = ((8, 8), (4, 8), (4, 4))  # three Qwen images per row: 16, 8 and 4 tokens


def llava_single_row(inputs: Inputs, row: int) -> Inputs:
    valid = inputs["attention_mask"][row].bool()
    images = inputs["pixel_values"].shape[0] // inputs["input_ids"].shape[0]
    return {"input_ids": inputs["input_ids"][row:row + 1, valid],
            "attention_mask": inputs["attention_mask"][row:row + 1, valid],
            "pixel_values": inputs["pixel_values"][row * images:(row + 1) * images]}


def _qwen(version: str) -> Callable[[int, int], Any]:
    def family(batch: int, seed: int) -> tuple[torch.nn.Module, Inputs, list[int], list[int]]:
        model = tiny_qwen2_vl(seed=seed, version=version)
        inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
        sizes = [int(t * h * w) // QWEN_MERGE**2 for t, h, w in inputs["image_grid_thw"]]
        return model, inputs, [QWEN_IMAGE_ID], sizes
    return family


def _tiled(build: Callable[..., Any], make: Callable[..., Inputs]) -> Callable[[int, int], Any]:
    def family(batch: int, seed: int) -> tuple[torch.nn.Module, Inputs, list[int], list[int]]:
        model = build(seed)
        inputs = make(batch, seed)
        adapter = adapt(model)
        tiles = int((inputs["input_ids"] == adapter.image_token_id).sum()) // adapter.tokens_per_image
        return model, inputs, [adapter.image_token_id], [adapter.tokens_per_image] * tiles
    return family


def _llava(batch: int, seed: int) -> tuple[torch.nn.Module, Inputs, list[int], list[int]]:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, images=3)
    adapter = adapt(model)
    images = inputs["pixel_values"].shape[0]
    return model, inputs, [adapter.image_token_id], [adapter.tokens_per_image] * images


FAMILIES = {
    "qwen2_vl": _qwen("2"),
    "qwen2_5_vl": _qwen("2.5"),
    "idefics3": _tiled(tiny_idefics3, lambda batch, seed: make_idefics3_inputs(
        batch=batch, images=(((2, 2),), ((1, 2), (0, 0)))[:batch], pad_left=2 if batch > 1 else 0, seed=seed)),
    "internvl": _tiled(tiny_internvl, lambda batch, seed: make_internvl_inputs(
        batch=batch, tiles=(3, 1), pad_left=2, seed=seed)),
    "llava": _llava,
}


def kept_vision(model: torch.nn.Module, inputs: Inputs, vision_ids: list[int]) -> list[torch.Tensor]:
    """Per row, the vision-token positions alive after prefill."""
    vision = torch.isin(inputs["input_ids"], torch.tensor(vision_ids))
    live = model.policyc.runtime.state.live()
    rows = []
    for row in range(inputs["input_ids"].shape[0]):
        kept = model.policyc.kept_positions[row]
        kept = kept if live is None else kept[live[row]]
        rows.append(kept[vision[row, kept]])
    return rows


def assert_equals_reference(model: torch.nn.Module, inputs: Inputs, vision_ids: list[int], sizes: list[int],
                             choose: Callable[[int], Any], policy: Any, params: dict[str, Any]) -> list[torch.Tensor]:
    expected_tokens, expected_kept, expected_logits = generate(model, inputs, vision_ids, sizes, choose,
                                                               max_new_tokens=4)
    policyc.compile(model, policy, **params)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
    kept = kept_vision(model, inputs, vision_ids)
    for row, expected in enumerate(expected_kept):
        assert torch.equal(kept[row], expected)
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], expected_tokens)
    torch.testing.assert_close(out.logits[0], expected_logits, rtol=0, atol=1e-5)
    return kept
