"""EfficientVLA's visual-token selection (`policies/efficientvla.tokpol`; arXiv:2506.10100 Eqs. 2-5) against the
plain reference (tests/reference/efficientvla.py): the same kept image tokens exactly, the same greedy tokens and
logits within 1e-5 (fp32), over seeds, budgets, layers, one sample and a left-padded batch of two."""

from __future__ import annotations

import pytest
import torch
from generation import assert_same_steps
from reference.efficientvla import efficientvla_generate
from reference.llm_stage import llava_llm_inputs, llm_stage_generate
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

import policyc
from policyc.lang import check_source, ir
from policyc.runtime import compile_model

STEPS = 4


@pytest.mark.parametrize(("seed", "batch", "layer", "k_final", "k_key", "alpha"), [
    (0, 1, 0, 8, 4, 0.5), (1, 2, 0, 10, 4, 0.5), (2, 2, 1, 6, 2, 0.5), (3, 1, 2, 9, 3, 0.25),
    (4, 2, 0, 12, 4, 1.0), (5, 2, 1, 7, 1, 0.0), (6, 1, 0, 56, 4, 0.5),  # 56 > 16 tokens: every one kept
])
@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
def test_efficientvla_equals_the_reference(build, seed: int, batch: int, layer: int, k_final: int,  # type: ignore[no-untyped-def]
                                           k_key: int, alpha: float) -> None:
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=5)
    tokens, expected_kept, logits = efficientvla_generate(model, **inputs, layer=layer, k_final=k_final,
                                                          k_key=k_key, alpha=alpha, max_new_tokens=STEPS)
    compiled = policyc.compile(model, "efficientvla", {
        "layer": ir.Number(value=layer), "k_final": ir.Number(value=k_final), "k_key": ir.Number(value=k_key),
        "alpha": ir.Number(value=alpha)}).policyc
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    image = inputs["input_ids"] == model.config.image_token_id
    for row in range(batch):
        rows = compiled.runtime.kept_at_layer[layer + 1][row]
        assert torch.equal(rows[image[row, rows]], expected_kept[row])
        assert len(expected_kept[row]) == min(k_final, 16)
    assert_same_steps(result, tokens, logits, inputs["input_ids"].shape[1])


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2)])
def test_similarity_mean_in_the_llm_equals_a_plain_computation(seed: int, batch: int) -> None:
    """`similarity(SET)` (reduce=mean, the default): the mean cosine of a token's layer output to SET's."""
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)

    def pick(_row: int, hidden: torch.Tensor, probs: torch.Tensor, valid: torch.Tensor,
             image: torch.Tensor) -> torch.Tensor:
        vision = (valid & image).nonzero().flatten()
        last = probs.mean(0)[-1, vision]
        key = torch.sort(last, descending=True, stable=True).indices[:2]
        rest = torch.tensor([i for i in range(len(vision)) if i not in set(key.tolist())])
        unit = hidden[vision] / hidden[vision].norm(dim=-1, keepdim=True)
        similar = (unit[rest] @ unit[key].T).mean(1)
        return vision[torch.cat([key, rest[torch.sort(similar, descending=True, stable=True).indices[:5]]])]
    ref, embeds, valid, image = llava_llm_inputs(model, **inputs)
    tokens, expected_kept, logits = llm_stage_generate(ref, embeds, valid, image, layer=1, pick=pick,
                                                       max_new_tokens=STEPS)
    text = ("policy s { stage llm.layer[1] { let key = top 2 of vision by attention(last -> vision)\n"
            "keep key | (top 5 of vision - key by similarity(key)) } }")
    compiled = policyc.compile(model, check_source(text)[0]).policyc
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    for row in range(batch):
        rows = compiled.runtime.kept_at_layer[2][row]
        assert torch.equal(rows[(inputs["input_ids"][row] == 100)[rows]], expected_kept[row])
    assert_same_steps(result, tokens, logits, inputs["input_ids"].shape[1])


def test_efficientvla_under_the_fx_graph_backend_equals_eager() -> None:
    model = tiny_llava_clip(seed=7)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=7, text_after=5)
    params = {"k_final": ir.Number(value=9), "k_key": ir.Number(value=3)}
    outputs = []
    for backend in ("eager", "fx"):
        compiled = compile_model(model, "efficientvla", params, backend=backend)
        outputs.append(model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                                      return_dict_in_generate=True))
        compiled.remove()
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for a, b in zip(outputs[0].scores, outputs[1].scores, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
