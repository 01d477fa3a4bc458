"""Runtime guards (policyc.runtime.guards): injected faults (NaN in the model, a selection that repeats or
drops protected tokens) raise GuardError naming the stage, the layer and the policy line; a healthy policy
keeps the same tokens for a sample wherever it sits in the batch."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_inputs, make_qwen_inputs, tiny_llava_clip, tiny_qwen2_vl

import policyc.runtime.llm as llm_runtime
from policyc.kernels import KERNELS
from policyc.lang import check_source
from policyc.runtime import compile_model
from policyc.runtime.guards import GuardError

FASTV = """policy guarded {
  stage llm.layer[1] as prune {
    protect top 2 of vision by attention(last -> vision)
    keep top 25% of vision by attention(last -> vision)
  }
}
"""


def compiled_fastv(model: torch.nn.Module):  # type: ignore[no-untyped-def]
    return compile_model(model, check_source(FASTV, "guarded.tokpol")[0])


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_nan_scores_raise_naming_the_layer_and_the_policy_line(family: str) -> None:
    model = tiny_llava_clip() if family == "llava" else tiny_qwen2_vl()
    inputs = make_inputs(model) if family == "llava" else make_qwen_inputs()
    with torch.no_grad():
        model.model.language_model.layers[1].self_attn.k_proj.weight.fill_(float("nan"))
    compiled = compiled_fastv(model)
    try:
        with pytest.raises(GuardError) as error:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
    finally:
        compiled.remove()
    text = str(error.value)
    assert "runtime guard: the score at LLM layer 1 scored" in text and "NaN" in text
    assert "guarded.tokpol:3:" in text and "fp16 overflow" in text


def test_repeated_kept_indices_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llava_clip()
    compiled = compiled_fastv(model)

    def repeating(keep: torch.Tensor, width: int) -> torch.Tensor:  # row 0, `width` times
        return torch.zeros(keep.shape[0], width, dtype=torch.long)

    monkeypatch.setattr(KERNELS["kept_rows"], "compute", repeating)
    try:
        with pytest.raises(GuardError, match=r"stage 'llm\.layer\[1\]' at LLM layer 1 kept token indices not sorted or "
                                             r"repeated \(sample 0"):
            model(**make_inputs(model))
    finally:
        compiled.remove()


def test_dropping_protected_tokens_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_llava_clip()
    compiled = compiled_fastv(model)
    run = llm_runtime._run_statements

    def forgets_protection(statements, evaluator, alive, hidden, next_layer):  # type: ignore[no-untyped-def]
        alive, hidden = run(statements, evaluator, alive, hidden, next_layer)
        return alive & ~evaluator.state.protected, hidden  # a faulty op: drops what it must keep

    monkeypatch.setattr(llm_runtime, "_run_statements", forgets_protection)
    try:
        with pytest.raises(GuardError, match=r"stage 'llm\.layer\[1\]' at LLM layer 1 dropped protected tokens "
                                             r"\(sample 0"):
            model(**make_inputs(model))
    finally:
        compiled.remove()


def test_kept_tokens_do_not_depend_on_the_batch_position() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=3, pad_left=[0, 2, 1], seed=5)
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(3))
    compiled = compiled_fastv(model)
    try:
        with torch.no_grad():
            model(**inputs)
            first = compiled.runtime.kept_at_layer[2].clone()
            order = torch.tensor([2, 0, 1])
            model(**{k: v[order] for k, v in inputs.items()})
            second = compiled.runtime.kept_at_layer[2]
    finally:
        compiled.remove()
    assert torch.equal(second, first[order])


RANDOM_IN_LLM = "policy r {\n  stage llm.layer[1] {\n    keep top 25% of vision by random(seed=4)\n  }\n}\n"


def test_random_pruning_keeps_the_same_tokens_whatever_the_batch_position_and_padding() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=3, pad_left=[2, 0, 1], seed=6)
    compiled = compile_model(model, check_source(RANDOM_IN_LLM, "r.tokpol")[0])

    def kept_image_offsets(batch: dict[str, torch.Tensor]) -> list[list[int]]:
        with torch.no_grad():
            model(**batch)
        kept = compiled.runtime.kept_at_layer[2]
        offsets = []
        for row, ids in zip(kept, batch["input_ids"], strict=True):
            image = (ids == model.config.image_token_id).nonzero().flatten()
            offsets.append([int(p) - int(image[0]) for p in row if int(p) in set(image.tolist())])
        return offsets

    try:
        batched = kept_image_offsets(inputs)
        alone = []
        for b in range(3):
            real = inputs["attention_mask"][b].bool()
            alone += kept_image_offsets({"input_ids": inputs["input_ids"][b, real][None],
                                         "attention_mask": inputs["attention_mask"][b, real][None],
                                         "pixel_values": inputs["pixel_values"][b:b + 1]})
    finally:
        compiled.remove()
    image_tokens = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    assert batched == alone and all(len(row) == int(0.25 * image_tokens) for row in batched)
