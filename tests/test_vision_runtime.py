"""The eager runtime's pre-LLM stages on tiny LLaVA models (CLIP and SigLIP towers): identity is
bit-exact at every hook point, ToMe, VisionZip, random drop and pooling equal plain references, and the
standard-library policies with encoder or projector stages compile and run."""

from __future__ import annotations

import pytest
import torch
from reference.fastv import prompt_embeddings
from reference.pool import pool_features
from reference.random_drop import random_keep
from reference.tome import tome_image_features, tome_last_logits, tome_llm_tokens
from reference.visionzip import visionzip_image_features
from tiny_models import IMAGE_TOKEN_ID, make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model

BUILDS = [tiny_llava_clip, tiny_llava_siglip]


def policy(text: str):  # type: ignore[no-untyped-def]
    return check_source(text, "p.tokpol")[0]


@torch.no_grad()
def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA's own projected image features [I, N, D], through whatever the model is compiled with."""
    return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))


def assert_matches(features: torch.Tensor, kept: torch.Tensor, expected: torch.Tensor, filled: torch.Tensor) -> None:
    assert torch.equal(kept, filled)
    assert kept.sum() < kept.numel()  # the method did compress
    torch.testing.assert_close(features[kept], expected[filled], atol=2e-5, rtol=1e-5)


IDENTITY_HOOKS = [
    "encoder.layer[0]", "encoder.layer[-2]", "encoder.layer[-1]", "encoder.layer[1].attention", "encoder.output",
]


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("hook", [*IDENTITY_HOOKS, "projector.output"])
def test_identity_at_every_pre_llm_hook_is_bit_exact(build, hook: str) -> None:  # type: ignore[no-untyped-def]
    model = build()
    inputs = make_inputs(model, batch=2)
    score = "random(seed=3)" if hook == "projector.output" else "key_norm"
    expected = image_features(model, inputs["pixel_values"])
    with torch.no_grad():
        logits = model(**inputs).logits
    compiled = compile_model(model, policy(f"policy p {{ stage {hook} {{ keep top 100% of vision by {score} }} }}"))
    try:
        assert torch.equal(image_features(model, inputs["pixel_values"]), expected)
        assert compiled.images.kept is not None and bool(compiled.images.kept.all())
        assert compiled.images.kept.shape == (2, 16) and not bool(compiled.images.protected.any())
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits)
    finally:
        compiled.remove()
    assert torch.equal(image_features(model, inputs["pixel_values"]), expected)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("r", [2, 5])
def test_tome_equals_the_plain_reference(build, r: int) -> None:  # type: ignore[no-untyped-def]
    model = build()
    pixel_values = make_inputs(model, batch=2, seed=1)["pixel_values"]
    expected, filled = tome_image_features(model, pixel_values, r)
    compiled = compile_model(model, "tome", {"r": ir.Number(value=r)})
    try:
        assert_matches(image_features(model, pixel_values), compiled.images.kept, expected, filled)
    finally:
        compiled.remove()


def tome_order(order: str, r: int = 3) -> str:
    return (f"policy t {{ stage encoder.layer[*].attention {{ merge bipartite(r={r}, order={order}) of vision by keys "
            "} }")


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("order", ["spatial", "code"])
def test_tome_tokens_reach_the_llm_in_the_order_asked(build, order: str) -> None:  # type: ignore[no-untyped-def]
    """Both orders against the plain reference: the tokens the LLM receives, in order, and its logits; the two
    orders give different logits, so the comparison tells them apart."""
    model = build()
    inputs = make_inputs(model, batch=2, seed=1)
    expected = tome_llm_tokens(model, inputs["pixel_values"], 3, order)
    logits = tome_last_logits(model, inputs, 3, order)
    other = tome_last_logits(model, inputs, 3, "code" if order == "spatial" else "spatial")
    assert (logits - other).abs().max() > 1e-3
    compiled = compile_model(model, policy(tome_order(order)))
    try:
        features = image_features(model, inputs["pixel_values"])
        for row, tokens in enumerate(expected):
            torch.testing.assert_close(features[row][compiled.images.kept[row]], tokens, atol=2e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs).logits[:, -1], logits, atol=2e-5, rtol=1e-5)
    finally:
        compiled.remove()
    spatial = logits if order == "spatial" else other
    for values, expected_logits in (({}, spatial), ({"order": ir.Name(id=order)}, logits)):  # tome.tokpol
        stdlib = compile_model(model, "tome", {"r": ir.Number(value=3), **values})  # its default: spatial
        try:
            with torch.no_grad():
                torch.testing.assert_close(model(**inputs).logits[:, -1], expected_logits, atol=2e-5, rtol=1e-5)
        finally:
            stdlib.remove()


def test_tome_code_order_is_refused_where_it_cannot_hold() -> None:
    from tiny_internvl import tiny_internvl

    model = tiny_llava_clip()
    problems = {
        "tokens of a projector.output stage keep their slots' order.*\\^":
            "policy t { stage projector.output { merge bipartite(r=2, order=code) of vision by hidden } }",
        "two orders of the LLM's tokens: code first, spatial here.*\\n.*order=spatial":
            "policy t { stage encoder.layer[0].attention { merge bipartite(r=2, order=code) of vision by keys } "
            "stage encoder.layer[1].attention { merge bipartite(r=2, order=spatial) of vision by keys } }",
    }
    for message, text in problems.items():
        with pytest.raises(PolicyError, match=f"(?s){message}"):
            compile_model(model, policy(text))
    with pytest.raises(PolicyError, match="internvl's connector reads every patch"):
        compile_model(tiny_internvl(), policy(tome_order("code", 2)))


def test_visionzip_equals_the_plain_reference() -> None:
    model = tiny_llava_clip()
    pixel_values = make_inputs(model, batch=2, seed=2)["pixel_values"]
    expected, filled = visionzip_image_features(model, pixel_values, dominant=6, contextual=3)
    compiled = compile_model(model, "visionzip", {"dominant": ir.Number(value=6), "contextual": ir.Number(value=3)})
    try:
        assert_matches(image_features(model, pixel_values), compiled.images.kept, expected, filled)
        assert compiled.images.kept.sum(1).tolist() == [9, 9]
    finally:
        compiled.remove()


def test_visionzip_needs_a_cls_token() -> None:
    with pytest.raises(PolicyError, match="no CLS token"):
        compile_model(tiny_llava_siglip(), "visionzip")


@pytest.mark.parametrize("build", BUILDS)
def test_random_drop_keeps_the_reference_tokens_with_unchanged_features(build) -> None:  # type: ignore[no-untyped-def]
    model = build()
    inputs = make_inputs(model, batch=3, seed=4)
    plain = image_features(model, inputs["pixel_values"])
    _, sizes = prompt_embeddings(model, inputs["input_ids"], inputs["pixel_values"])
    reference = random_keep(inputs["input_ids"], IMAGE_TOKEN_ID, sizes, 0.25, seed=7)
    first = (inputs["input_ids"] == IMAGE_TOKEN_ID).int().argmax(1)
    filled = torch.zeros_like(plain[:, :, 0], dtype=torch.bool)
    for row, kept in enumerate(reference):
        filled[row, kept - first[row]] = True
    compiled = compile_model(model, "random_drop", {"seed": ir.Number(value=7)})
    try:
        features = image_features(model, inputs["pixel_values"])
        assert torch.equal(compiled.images.kept, filled)
        assert torch.equal(features[filled], plain[filled])
    finally:
        compiled.remove()


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("size", [2, 3])
def test_pool_equals_the_plain_reference(build, size: int) -> None:  # type: ignore[no-untyped-def]
    model = build()
    pixel_values = make_inputs(model, batch=2, seed=5)["pixel_values"]
    expected, filled = pool_features(image_features(model, pixel_values), (4, 4), size)
    compiled = compile_model(model, "pool", {"size": ir.Number(value=size)})
    try:
        assert_matches(image_features(model, pixel_values), compiled.images.kept, expected, filled)
    finally:
        compiled.remove()


def test_grid_keeps_a_uniform_subgrid() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    compiled = compile_model(model, "grid")  # 25% of a 4 x 4 grid: rows and columns 0 and 2
    try:
        image_features(model, inputs["pixel_values"])
        kept = compiled.images.kept[0].view(4, 4)
        assert kept.nonzero().tolist() == [[r, c] for r in (0, 2) for c in (0, 2)]
    finally:
        compiled.remove()


MUSTDROP_ENCODER = """policy m {
  use mustdrop.merge(similar=0.1)
  use mustdrop.key_set
}"""


@pytest.mark.parametrize("name", ["tome", "visionzip", "random_drop", "pool", "grid", "mustdrop_encoder"])
def test_stdlib_pre_llm_policies_compile_and_generate(name: str) -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=2)
    compiled = compile_model(model, policy(MUSTDROP_ENCODER) if name == "mustdrop_encoder" else name)
    try:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
        kept, protected = compiled.runtime.image_slots  # what the prefill took from the pre-LLM stages
        assert kept.shape == protected.shape == (2, 16) and bool((protected <= kept).all())
        if name == "mustdrop_encoder":
            assert protected.sum(1).tolist() == [2, 2]  # ceil(8%) of the 16 patches, as MustDrop's code rounds up
    finally:
        compiled.remove()


def test_window_merge_folds_similar_windows_into_their_top_left_slot() -> None:
    model = tiny_llava_clip()
    pixel_values = make_inputs(model)["pixel_values"]
    every = policy("policy w { stage encoder.layer[0] { merge window(size=2, threshold=-1) of vision by hidden } }")
    compiled = compile_model(model, every)
    try:
        image_features(model, pixel_values)
        kept = compiled.images.kept[0].view(4, 4)
        assert kept.nonzero().tolist() == [[r, c] for r in (0, 2) for c in (0, 2)]
    finally:
        compiled.remove()
    never = policy("policy w { stage encoder.layer[0] { merge window(size=2, threshold=1) of vision by hidden } }")
    plain = image_features(model, pixel_values)
    compiled = compile_model(model, never)
    try:
        assert torch.equal(image_features(model, pixel_values), plain) and bool(compiled.images.kept.all())
    finally:
        compiled.remove()


@pytest.mark.parametrize("objective", ["min", "sum"])
def test_diverse_selection_equals_the_plain_divprune_reference(objective: str) -> None:
    from reference.divprune import divprune_keep

    model = tiny_llava_siglip()
    pixel_values = make_inputs(model, batch=2, seed=6)["pixel_values"]
    plain = image_features(model, pixel_values)
    source = f"policy d {{ stage projector.output {{ keep diverse(objective={objective}) 5 of vision by hidden }} }}"
    compiled = compile_model(model, policy(source))
    try:
        features = image_features(model, pixel_values)
        assert torch.equal(compiled.images.kept, divprune_keep(plain, 5, objective))
        assert torch.equal(features[compiled.images.kept], plain[compiled.images.kept])
    finally:
        compiled.remove()


def test_the_compile_report_counts_what_the_stages_before_the_llm_hand_over() -> None:
    from policyc.report import measure

    model = tiny_llava_clip()
    inputs = make_inputs(model)
    compiled = compile_model(model, "random_drop")
    try:
        report = measure(compiled, inputs, "tiny")
        (entry,) = report.kept
        assert (entry.point, entry.layer, entry.before, entry.after) == ("projector.output", None, 16, 4)
        assert len(entry.kept_patches) == 4 and set(entry.kept_patches) <= set(range(16))
        assert report.llm_tokens_per_layer == [inputs["input_ids"].shape[1] - 12] * 4
        assert report.flops_after.llm < report.flops_before.llm
    finally:
        compiled.remove()


def test_the_compile_report_counts_the_encoder_rows_each_layer_ran_on() -> None:
    """ToMe merges r pairs per layer: each later encoder layer runs on fewer rows, and the report's encoder
    FLOPs are those of the rows each layer really ran on (layers past the feature layer do not run)."""
    from policyc.report import _linear_macs as linear_macs
    from policyc.report import layer_flops, measure

    model = tiny_llava_clip(num_vision_layers=3)
    inputs = make_inputs(model, batch=2, pad_left=1)
    compiled = compile_model(model, policy("policy t { stage encoder.layer[*].attention { "
                                           "merge bipartite(r=2) of vision by keys } }"))
    try:
        report = measure(compiled, inputs, "tiny")
        rows = compiled.images.encoder_rows.tolist()
        assert rows == [[17, 15, 0], [17, 15, 0]]  # CLS + 16 patches; 2 merged inside layer 0; layer 2 unused
        adapter = compiled.plan.adapter
        expected = sum(layer_flops(n, linear_macs(layer), adapter.vision_num_heads, adapter.vision_head_dim)
                       for layer, n in zip(adapter.vision_layers, rows[0], strict=True))
        assert report.flops_after.encoder == 2 * expected  # the report scales one row's cost by the batch
        assert report.flops_after.encoder < report.flops_before.encoder
    finally:
        compiled.remove()
