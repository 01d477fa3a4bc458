"""policyc.integrations.vllm's Qwen2-VL / Qwen2.5-VL pieces without vLLM: the shell's pre-LLM run (the transformers
tower and merger the vLLM model serves with) keeps the same slots and embeddings as policyc compiled onto the whole
transformers model; the probe's count per grid equals them; the M-RoPE positions of a pruned prompt are transformers'
positions of the unpruned prompt with the dropped image tokens' columns removed; unservable policies and families
are refused. (vLLM itself: tests/integrations/test_vllm_qwen.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs, tiny_qwen2_vl

from policyc.errors import PolicyError
from policyc.integrations.vllm.deployment import deployment
from policyc.integrations.vllm.guard import check_deployment
from policyc.integrations.vllm.qwen_stages import QwenPreLLM, kept_mrope_positions, qwen_kept_count, qwen_shell
from policyc.lang.build import parse_value
from policyc.runtime import compile_model

GRIDS = ((8, 8), (4, 12), (12, 4))  # patches per side of a prompt's three images: 16, 12 and 12 merged tokens
CASES = [("divprune", {"ratio": "25%"}), ("random_drop", {}), ("tome", {"r": 2}), ("todre_diversity", {})]


def _config(model: Any, entry: dict[str, Any]) -> Any:
    config = model.config
    config.policyc = entry
    return config


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize(("policy", "params"), CASES, ids=[p for p, _ in CASES])
def test_shell_keeps_what_transformers_keeps(version: str, policy: str, params: dict[str, Any]) -> None:
    model = tiny_qwen2_vl(version=version)
    inputs = make_qwen_inputs(grids=GRIDS)
    assignments = {name: parse_value(str(value)) for name, value in params.items()}
    compiled = compile_model(model, policy, assignments)
    try:
        with torch.no_grad():
            features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                      image_grid_thw=inputs["image_grid_thw"]).pooler_output
        kept = compiled.images.kept
        expected = [torch.arange(len(f)) for f in features] if kept is None else \
            [k.nonzero()[:, 0] for k in kept.split([len(f) for f in features])]
        expected_rows = [f[k] for f, k in zip(features, expected, strict=True)]
    finally:
        compiled.remove()
    shell = qwen_shell(model.config)
    shell.model.visual.load_state_dict(model.model.visual.state_dict())
    served = deployment(_config(model, {"policy": policy, "params": params}))
    assert served is not None
    stages = QwenPreLLM(shell, served)
    rows, slots = stages(inputs["pixel_values"], inputs["image_grid_thw"])
    stages.compiled.remove()
    assert [s.tolist() for s in slots] == [k.tolist() for k in expected]
    for got, want in zip(rows, expected_rows, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    counts = [qwen_kept_count(model.config, served, grid) for grid in GRIDS]
    assert counts == [len(k) for k in expected]


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_positions_are_the_unpruned_ones_of_the_kept_tokens(version: str) -> None:
    """Two images, some of their tokens dropped: each kept token at its transformers position in the unpruned prompt,
    the text likewise, and the delta after the prompt as transformers' (counted on the pruned prompt)."""
    model = tiny_qwen2_vl(version=version)
    inputs = make_qwen_inputs(grids=((4, 8), (8, 4)), text_before=3, text_after=5)
    ids = inputs["input_ids"][0]
    unpruned, deltas = model.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                                  image_grid_thw=inputs["image_grid_thw"],
                                                  attention_mask=inputs["attention_mask"])
    image = (ids == QWEN_IMAGE_ID).nonzero()[:, 0]
    first, second = image[:8], image[8:]
    kept = [torch.tensor([0, 3, 4, 7]), torch.tensor([1, 2, 6])]  # of each image's 8 merged tokens
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[image] = False
    keep[first[kept[0]]] = keep[second[kept[1]]] = True
    length = int(keep.sum())
    offsets = [int(first[0]), int(first[0]) + 4 + int(second[0] - first[-1] - 1)]
    positions, delta = kept_mrope_positions(length, [(offsets[0], 2, 4, kept[0]), (offsets[1], 4, 2, kept[1])])
    assert positions.tolist() == unpruned[:, 0, keep].tolist()
    assert delta == int(deltas[0]) + len(ids) - length


def test_unservable_policies_and_other_families_are_refused() -> None:
    """CLS readers (no CLS on Qwen), LLM stages and grid merges are refused; Qwen2-VL passes the guard with a
    servable policy; Qwen3-VL is another family, refused by name."""
    from tiny_qwen3_vl import tiny_qwen3_vl

    config = tiny_qwen2_vl().config
    for policy, message in [("fastervlm", "has no CLS token"), ("fastv", "inside the LLM"),
                            ("pool", "pool needs the image patch grid")]:
        config.policyc = {"policy": policy}
        with pytest.raises(PolicyError, match=message):
            check_deployment(config, "Qwen2VLForConditionalGeneration")
    config.policyc = {"policy": "divprune", "params": {"ratio": "25%"}}
    check_deployment(config, "Qwen2VLForConditionalGeneration")
    other = tiny_qwen3_vl().config
    other.policyc = {"policy": "divprune"}
    with pytest.raises(PolicyError) as caught:
        check_deployment(other, "Qwen3VLForConditionalGeneration")
    assert "policyc cannot serve this 'qwen3_vl' model" in str(caught.value)
    assert "its plugin serves LLaVA (a CLIP or SigLIP vision tower), Qwen2-VL, Qwen2.5-VL" in str(caught.value)
