"""Vision-encoder methods of the standard library (FasterVLM, HiPrune, VTC-CLS, EViT) against plain
references in tests/reference/: the same kept image slots exactly, projected features and the LLM's
logits within fp32 tolerance, over seeds, budgets and batches of 1 and 2 images; each also generates."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from reference.fastervlm import fastervlm_image_features
from reference.hiprune import hiprune_image_features
from tiny_models import IMAGE_TOKEN_ID, make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.runtime import compile_model

Reference = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA's own projected image features [I, N, D], through whatever the model is compiled with."""
    return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))


@torch.no_grad()
def shrunk_prompt_logits(model: torch.nn.Module, input_ids: torch.Tensor, features: torch.Tensor,
                         filled: torch.Tensor) -> torch.Tensor:
    """Last-position logits [B, V] of the unmodified LLM on each prompt whose image run holds only the
    reference's kept features (one image per row, no padding)."""
    embed = model.get_input_embeddings()
    rows = []
    for ids, image, kept in zip(input_ids, features, filled, strict=True):
        where = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
        start, stop = int(where[0]), int(where[-1]) + 1
        rows.append(torch.cat([embed(ids[:start]), image[kept], embed(ids[stop:])]))
    hidden = model.model.language_model(inputs_embeds=torch.stack(rows)).last_hidden_state
    return model.lm_head(hidden[:, -1])


def assert_equals_reference(model: torch.nn.Module, name: str, params: dict[str, ir.Expr], reference: Reference,
                            batch: int, seed: int) -> torch.Tensor:
    """Compiles `name` with `params`, checks kept slots, features and logits against `reference`; returns the
    kept slots [I, N]."""
    inputs = make_inputs(model, batch=batch, seed=seed)
    expected, filled = reference(model, inputs["pixel_values"])
    expected_logits = shrunk_prompt_logits(model, inputs["input_ids"], expected, filled)
    compiled = compile_model(model, name, params)
    try:
        features = image_features(model, inputs["pixel_values"])
        kept = compiled.images.kept
        assert torch.equal(kept, filled)
        assert kept.sum() < kept.numel()  # the method did compress
        torch.testing.assert_close(features[kept], expected[filled], atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (batch, inputs["input_ids"].shape[1] + 3)
    finally:
        compiled.remove()
    return kept


def number(value: int | float) -> ir.Number:
    return ir.Number(value=value)


# ---------------------------------------------------------------- FasterVLM


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "tokens"), [(0, 3), (1, 5), (2, 11)])
def test_fastervlm_equals_the_plain_reference(batch: int, seed: int, tokens: int) -> None:
    model = tiny_llava_clip(seed=seed)
    kept = assert_equals_reference(model, "fastervlm", {"tokens": number(tokens)},
                                   lambda m, p: fastervlm_image_features(m, p, tokens), batch, seed)
    assert kept.sum(1).tolist() == [tokens] * batch


def test_fastervlm_needs_a_cls_token() -> None:
    with pytest.raises(PolicyError, match="no CLS token"):
        compile_model(tiny_llava_siglip(), "fastervlm")


# ---------------------------------------------------------------- HiPrune

BUILDS = [tiny_llava_clip, tiny_llava_siglip]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "tokens", "alpha"), [(0, 7, 0.5), (1, 12, 1.0), (2, 10, 0.75), (3, 10, 0.25)])
def test_hiprune_equals_the_plain_reference(build, batch: int, seed: int, tokens: int,  # type: ignore[no-untyped-def]
                                            alpha: float) -> None:
    model = build(seed=seed)
    params = {"tokens": number(tokens), "alpha": number(alpha), "object_layer": number(0)}
    kept = assert_equals_reference(model, "hiprune", params,
                                   lambda m, p: hiprune_image_features(m, p, tokens, alpha, 0), batch, seed)
    assert kept.sum(1).tolist() == [tokens] * batch  # anchors, buffers and registers fill the budget


def test_dilate_grows_a_set_by_its_grid_neighbours_clamped_without_row_wrap() -> None:
    from policyc.passes.dilate import dilate

    patches = torch.arange(-1, 16)[None]  # a CLS position, then a 4 x 4 grid
    members = torch.zeros(1, 17, dtype=torch.bool)
    members[0, 1 + torch.tensor([3, 5])] = True  # patches 3 (end of row 0) and 5
    grown = (dilate(members, patches, (4, 4))[0, 1:]).nonzero().flatten().tolist()
    # 3: 2, 4 (the next row's first patch: no wrap guard), 0 (3 - 4 clamped), 7; 5: 4, 6, 1, 9
    assert grown == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    twice = (dilate(members[:, :], patches, (4, 4), radius=2)[0, 1:]).nonzero().flatten().tolist()
    assert set(grown) < set(twice)
