"""ToDRE's task-relevance stage (`policies/todre.tokpol`, stage `relevance`; arXiv:2505.18757 v2 Eq. 8), alone and
after the diversity stage, against the plain reference (tests/reference/todre.py): the same image tokens after
the check layer exactly (all or none, each sample deciding alone), the same greedy tokens and logits within 1e-5
(fp32), for one sample and a left-padded batch of two."""

from __future__ import annotations

import pytest
import torch
from generation import assert_same_steps
from reference.llm_stage import llm_stage_generate
from reference.todre import relevance_shares, stage_one, todre_generate
from tiny_models import make_inputs, tiny_llava_clip

import policyc
from policyc.lang import check_source

STEPS = 4
DEPTH = 8
CHECK = 7 * DEPTH // 8 - 1  # the policy's llm.layer[7 * depth / 8 - 1]
STAGE_TWO = "policy relevance { use todre.relevance }"


def text_shares(model: torch.nn.Module, inputs: dict[str, torch.Tensor], ratio: int | None = None,
                objective: str = "sum") -> list[float]:
    """Each row's a_tv at the check layer (after stage 1 when `ratio` is given), from the reference."""
    ref, prompts = stage_one(model, **inputs, ratio=ratio, objective=objective)
    shares: list[float] = []

    def record(_row: int, _hidden: torch.Tensor, probs: torch.Tensor, ok: torch.Tensor, img: torch.Tensor,
               ) -> torch.Tensor:
        shares.append(relevance_shares(probs, ok, img)[0])
        return img.nonzero().flatten()
    for prompt in prompts:
        llm_stage_generate(ref, prompt.embeds[None], torch.ones(1, len(prompt.index), dtype=torch.bool),
                           prompt.image[None], layer=CHECK, pick=record, max_new_tokens=1)
    return shares


def run_compiled(model: torch.nn.Module, policy: object, params: dict[str, object],
                 inputs: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    compiled = policyc.compile(model, policy, params).policyc
    result = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                            return_dict_in_generate=True)
    state = compiled.runtime.state
    live = state.live()
    image = inputs["input_ids"] == model.config.image_token_id
    kept = []
    for row in range(image.shape[0]):
        rows = state.kept[row] if live is None else state.kept[row][live[row]]
        kept.append(rows[image[row, rows]])
    compiled.remove()
    return result, kept


def assert_equal_to_reference(result, kept, tokens, expected_kept, logits, prompt: int) -> None:  # type: ignore[no-untyped-def]
    for row, expected in enumerate(expected_kept):
        assert torch.equal(torch.sort(kept[row]).values, expected)
    assert_same_steps(result, tokens, logits, prompt)


@pytest.mark.parametrize(("seed", "batch"), [(0, 1), (1, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("where", ["below", "between", "above"])
def test_relevance_stage_alone_equals_the_reference(seed: int, batch: int, where: str) -> None:
    """tau below every row's a_tv keeps everything, above every row's drops every image token, and between the two
    rows of a batch drops one row's image tokens only."""
    model = tiny_llava_clip(seed=seed, num_llm_layers=DEPTH)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed, text_after=5)
    shares = text_shares(model, inputs)
    low, high = min(shares), max(shares)
    tau = {"below": low / 2, "between": (low + high) / 2, "above": (1 + high) / 2}[where]
    tokens, expected_kept, logits = todre_generate(model, **inputs, ratio=None, objective="sum", tau=tau,
                                                   layer=CHECK, max_new_tokens=STEPS)
    dropped = [len(k) == 0 for k in expected_kept]
    assert dropped == [s < tau for s in shares]
    if where == "between" and batch == 2 and low < high:
        assert dropped.count(True) == 1  # the samples of one batch decide apart
    result, kept = run_compiled(model, check_source(STAGE_TWO)[0], {"todre.tau": tau}, inputs)
    assert_equal_to_reference(result, kept, tokens, expected_kept, logits, inputs["input_ids"].shape[1])


@pytest.mark.parametrize(("seed", "batch", "objective", "ratio", "where"), [
    (0, 2, "sum", 50, "between"), (1, 1, "min", 25, "keep"), (1, 1, "min", 25, "drop"), (2, 2, "sum", 75, "between"),
    (6, 2, "min", 50, "drop"), (4, 2, "sum", 10, "keep")])
def test_both_stages_equal_the_reference(seed: int, batch: int, objective: str, ratio: int, where: str) -> None:
    """After the diversity stage, the relevance stage keeps every image token left (tau = 0), drops them all
    (tau above 1), or drops one row's (tau between the two rows' a_tv)."""
    model = tiny_llava_clip(seed=seed, num_llm_layers=DEPTH)
    inputs = make_inputs(model, batch=batch, pad_left=3, seed=seed, text_after=5)
    shares = text_shares(model, inputs, ratio, objective)
    tau = {"keep": 0.0, "between": (min(shares) + max(shares)) / 2, "drop": 1.01}[where]
    tokens, expected_kept, logits = todre_generate(model, **inputs, ratio=ratio, objective=objective, tau=tau,
                                                   layer=CHECK, max_new_tokens=STEPS)
    if where == "between":
        assert [len(k) == 0 for k in expected_kept].count(True) == 1
    result, kept = run_compiled(model, "todre", {"ratio": policyc.lang.ir.Percent(value=ratio),
                                                 "objective": policyc.lang.ir.Name(id=objective), "tau": tau}, inputs)
    assert_equal_to_reference(result, kept, tokens, expected_kept, logits, inputs["input_ids"].shape[1])


def test_tau_zero_turns_the_relevance_stage_off() -> None:
    model = tiny_llava_clip(seed=5, num_llm_layers=DEPTH)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=5, text_after=5)
    _, kept = run_compiled(model, check_source(STAGE_TWO)[0], {"todre.tau": 0.0}, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    for row in range(2):
        assert torch.equal(torch.sort(kept[row]).values, image[row].nonzero().flatten())
