"""Multi-stage drops with `positions compact` (PyramidDrop's numbering) and `original`, against the
plain reference in tests/reference/staged_drop.py: same kept rows after every stage, same tokens."""

from __future__ import annotations

import pytest
import torch
from reference.staged_drop import staged_drop_generate
from tiny_models import make_inputs, tiny_llava_clip

from policyc.lang import check_source
from policyc.runtime import compile_model


@pytest.mark.parametrize("next_layer", [False, True])
@pytest.mark.parametrize("mode", ["compact", "original"])
@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2), (2, 1)])
def test_staged_drops_equal_the_reference(mode: str, seed: int, batch: int, next_layer: bool) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2 if batch > 1 else 0, seed=seed)
    stages = [(0, 12), (2, 5)]
    expected_tokens, expected_kept = staged_drop_generate(
        model, inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], stages=stages,
        compact=mode == "compact", max_new_tokens=6, next_layer=next_layer)
    signal = "attention(last -> vision" + (", layer=next)" if next_layer else ")")
    text = f"""policy p {{
      stage llm.layer[0] {{ keep top 12 of vision by {signal}
                            positions {mode} }}
      stage llm.layer[2] {{ keep top 5 of vision by {signal}
                            positions {mode} }}
    }}"""
    compiled = compile_model(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    for row in range(batch):
        assert torch.equal(compiled.runtime.kept_at_layer[3][row], expected_kept[row][-1])
        assert torch.equal(compiled.runtime.kept_at_layer[1][row], expected_kept[row][0])
    assert torch.equal(tokens, expected_tokens)
