"""The compiled FastV policy against an independent plain implementation (tests/reference/fastv.py:
eager attention, output probabilities, no KV cache, full recompute each step): the same kept image
tokens exactly and the same generated tokens, over seeds, budgets, layers and batches."""

from __future__ import annotations

import pytest
import torch
from reference.fastv import fastv_generate
from tiny_models import make_inputs, tiny_llava_clip

from policyc.lang import check_source, ir
from policyc.runtime import compile_model


@pytest.mark.parametrize(("seed", "layer", "keep", "rows"), [
    (0, 1, 50, "last"), (1, 0, 25, "last"), (2, 2, 75, "last"), (3, 1, 6, "last"), (4, 3, 10, "last"),
    (0, 1, 50, "all"), (5, 2, 25, "all"), (6, 0, 60, "all"),  # the paper's mean over every query row
])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_fastv_equals_the_reference(seed: int, layer: int, keep: int, rows: str, batch: int) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2 if batch > 1 else 0, seed=seed)
    expected_tokens, expected_kept = fastv_generate(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], layer=layer,
        keep=keep if keep < 16 else keep / 100, max_new_tokens=6, rows=rows)
    if keep < 16:  # a count: a policy of its own
        text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
        compiled = compile_model(model, check_source(text)[0])
    else:  # a share: the standard library's fastv.tokpol itself, with its parameters set
        compiled = compile_model(model, "fastv", {"layer": ir.Number(value=layer), "ratio": ir.Percent(value=keep),
                                                  "rows": ir.Name(id=rows)})
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    image = inputs["input_ids"] == 100
    for row in range(batch):
        kept = compiled.kept_positions[row]
        assert torch.equal(kept[image[row, kept]], expected_kept[row])
    assert torch.equal(tokens, expected_tokens)

