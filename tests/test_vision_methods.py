"""Vision-encoder methods of the standard library (FasterVLM, HiPrune, VTC-CLS, EViT, FlowCut) against plain
references in tests/reference/: the same kept image slots exactly, projected features and the LLM's
logits within fp32 tolerance, over seeds, budgets and batches of 1 and 2 images; each also generates."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from reference.evit import evit_image_features
from reference.fastervlm import cls_attention_rows, fastervlm_image_features, top_patches
from reference.flowcut import flowcut_image_features
from reference.hiprune import hiprune_image_features
from reference.vision import layers as vision_layers
from reference.vtc_cls import vtc_cls_image_features
from tiny_models import IMAGE_TOKEN_ID, make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source, ir
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


@pytest.mark.parametrize(("name", "params"), [
    ("fastervlm", {}),
    ("vtc_cls", {"start": number(0)}),
    ("evit", {"first_layer": number(0), "last_layer": number(1), "every": number(1)}),
    ("flowcut", {"last_layer": number(0)}),
])
def test_cls_attention_methods_fail_clearly_on_siglip(name: str, params: dict[str, ir.Expr]) -> None:
    with pytest.raises(PolicyError, match="has no CLS token"):
        compile_model(tiny_llava_siglip(), name, params)


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
    from policyc.passes.function_dilate import dilate

    patches = torch.arange(-1, 16)[None]  # a CLS position, then a 4 x 4 grid
    members = torch.zeros(1, 17, dtype=torch.bool)
    members[0, 1 + torch.tensor([3, 5])] = True  # patches 3 (end of row 0) and 5
    grown = (dilate(members, patches, (4, 4))[0, 1:]).nonzero().flatten().tolist()
    # 3: 2, 4 (the next row's first patch: no wrap guard), 0 (3 - 4 clamped), 7; 5: 4, 6, 1, 9
    assert grown == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    twice = (dilate(members[:, :], patches, (4, 4), radius=2)[0, 1:]).nonzero().flatten().tolist()
    assert set(grown) < set(twice)


# ---------------------------------------------------------------- VTC-CLS


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "tokens", "start"), [(0, 4, 0), (1, 6, 1), (2, 9, 0)])
def test_vtc_cls_equals_the_plain_reference(batch: int, seed: int, tokens: int, start: int) -> None:
    model = tiny_llava_clip(seed=seed)
    kept = assert_equals_reference(model, "vtc_cls", {"tokens": number(tokens), "start": number(start)},
                                   lambda m, p: vtc_cls_image_features(m, p, tokens, start), batch, seed)
    assert kept.sum(1).tolist() == [tokens] * batch


def test_vtc_cls_sums_layers_unlike_the_feature_layer_alone() -> None:
    """The ensemble is not FasterVLM in disguise: on this model and image they keep different patches."""
    model = tiny_llava_clip(seed=2)
    pixel_values = make_inputs(model, seed=2)["pixel_values"]
    _, ensemble = vtc_cls_image_features(model, pixel_values, 5, 0)
    _, single = fastervlm_image_features(model, pixel_values, 5)
    assert not torch.equal(ensemble, single)


@pytest.mark.parametrize("batch", [1, 2])
def test_attention_of_an_earlier_layer_is_as_that_layer_computed_it(batch: int) -> None:
    """Layer 0's CLS row read at layer 1, after a stage at layer 0 dropped patches: the scores are layer 0's,
    softmax over every token it ran on (a plain run of layer 0 on all patches), ranked among the survivors."""
    model = tiny_llava_clip(seed=3)
    pixel_values = make_inputs(model, batch=batch, seed=3)["pixel_values"]
    source = """policy p {
      stage encoder.layer[0] { keep top 12 of vision by key_norm }
      stage encoder.layer[1] { keep top 5 of vision by attention(cls -> vision, layer=0) }
    }"""
    compiled = compile_model(model, check_source(source, "p.tokpol")[0])
    try:
        image_features(model, pixel_values)
        kept = compiled.images.kept
    finally:
        compiled.remove()
    first_stage = compile_model(model, check_source(source.replace("5 of", "100% of"), "p.tokpol")[0])
    try:
        image_features(model, pixel_values)
        survivors = first_stage.images.kept
    finally:
        first_stage.remove()
    for image, alive, chosen in zip(pixel_values, survivors, kept, strict=True):
        _, rows = cls_attention_rows(model, image)
        score = rows[0].masked_fill(~alive, float("-inf"))
        assert chosen.nonzero().flatten().tolist() == top_patches(score, 5)
    assert kept.sum(1).tolist() == [5] * batch


@pytest.mark.parametrize(("text", "message"), [
    ("attention(cls -> vision, layers=0..2)", "reads encoder layer 2, which runs after this stage"),
    ("attention(cls -> vision, layer=-1)", "reads encoder layer 2, which runs after this stage"),
    ("attention(cls -> vision, layers=1..0)", "layer range 1..0 is empty"),
    ("attention(cls -> vision, layers=-7..1)", "encoder layer -7 does not exist"),
])
def test_attention_at_other_encoder_layers_fails_at_compile_time(text: str, message: str) -> None:
    source = f"policy p {{ stage encoder.layer[1] {{ keep top 4 of vision by {text} }} }}"
    with pytest.raises(PolicyError, match=message):
        compile_model(tiny_llava_clip(), check_source(source, "p.tokpol")[0])


# ---------------------------------------------------------------- EViT


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "keep_rate", "fuse_layers"), [(0, 0.7, (0, 1)), (1, 0.5, (0, 1)), (2, 0.6, (1,)),
                                                                 (3, 0.8, (0,))])
def test_evit_equals_the_plain_reference(batch: int, seed: int, keep_rate: float, fuse_layers: tuple[int, ...],
                                         ) -> None:
    model = tiny_llava_clip(seed=seed)
    params = {"keep_rate": number(keep_rate), "first_layer": number(fuse_layers[0]),
              "last_layer": number(fuse_layers[-1]), "every": number(1)}
    kept = assert_equals_reference(model, "evit", params,
                                   lambda m, p: evit_image_features(m, p, keep_rate, list(fuse_layers)), batch, seed)
    expected = 16
    for _ in fuse_layers:
        expected = math.ceil(keep_rate * expected) + 1  # the attentive tokens and the fused one
    assert kept.sum(1).tolist() == [expected] * batch



# ---------------------------------------------------------------- FlowCut


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "tokens"), [(0, 4), (1, 6), (2, 9)])
def test_flowcut_equals_the_plain_reference(batch: int, seed: int, tokens: int) -> None:
    """8 encoder layers (feature layer 6: FlowCut at layers 0..5, pruning after 1, 3 and 5); queries scaled up so
    the CLS attention is peaked enough for the entropy schedule to prune before the last layer (random tiny
    weights attend almost uniformly), by different amounts per image (seed 0: 16 -> 13 -> 11 -> 4 patches and
    16 -> 14 -> 12 -> 4): later layers run on those rows, so the features match only if every count does."""
    model = tiny_llava_clip(seed=seed, num_vision_layers=8)
    with torch.no_grad():
        for layer in vision_layers(model):
            layer.self_attn.q_proj.weight.mul_(48)
    params = {"tokens": number(tokens), "last_layer": number(5)}
    kept = assert_equals_reference(model, "flowcut", params,
                                   lambda m, p: flowcut_image_features(m, p, tokens, 5), batch, seed)
    assert kept.sum(1).tolist() == [tokens] * batch

