"""CATP (`policies/catp.tokpol`: the `facility` selector, `attention(layer=previous)`, `sample`,
`centroid_similarity`) against the plain reference in tests/reference/catp.py: the same kept image slots before the
LLM and the same tokens after its two pruning layers, exactly; projected features and the LLM's logits within 1e-5;
over seeds, shares, lam, both rescales, CLIP and SigLIP, batches of 1 and 2 (left padding) and the multi-image
prompts of in-context learning; and `policyc run catp` on the embedded default (one image: stage 2 skipped)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from reference.catp import catp_prefill, catp_stage1
from reference.fastv import eager_copy
from tiny_mistral3 import tiny_mistral3
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.cli import main
from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model


def params(kept: float, lam: float, rescale: str, layer: int = 1, lam2: float = 0.6,
           kept_llm: float = 100) -> dict[str, ir.Expr]:
    return {"kept": ir.Percent(value=kept), "lam": ir.Number(value=lam), "rescale": ir.Name(id=rescale),
            "layer": ir.Number(value=layer), "lam2": ir.Number(value=lam2), "kept_llm": ir.Percent(value=kept_llm)}


def run_and_compare(model: torch.nn.Module, inputs: dict[str, torch.Tensor], values: dict[str, ir.Expr],
                    expected: tuple[torch.Tensor, torch.Tensor, list[list[int]]], layer: int | None) -> None:
    """policyc's kept slots, the tokens surviving layer + 1 and the logits against the reference's `expected`."""
    slots, expected_logits, survivors = expected
    compiled = compile_model(model, "catp", values)
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        assert torch.equal(compiled.runtime.image_slots[0], slots)
        if layer is not None:  # the rows after the prefill's last stage (what layer + 2 reads, where it exists)
            state = compiled.runtime.state
            rows, live = state.kept, state.live()
            for b, expected_rows in enumerate(survivors):
                mine = rows[b] if live is None else rows[b][live[b]]
                valid = inputs["attention_mask"][b].bool()[mine]
                assert mine[valid].tolist() == expected_rows
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + 2)
    finally:
        compiled.remove()


@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
@pytest.mark.parametrize(("batch", "pad", "images", "after"), [(1, 0, 1, 5), (2, 2, 1, 5), (2, 1, 3, 4),
                                                                (1, 0, 4, 0)])
@pytest.mark.parametrize(("seed", "kept", "lam", "rescale"), [(0, 61.1, 0.7, "shift"), (1, 50, 2.0, "shift"),
                                                              (2, 30, 0.7, "clamp"), (3, 80, 0.0, "shift")])
def test_catp_stage1_equals_the_plain_reference(build, batch: int, pad: int, images: int, after: int,  # type: ignore[no-untyped-def]
                                                seed: int, kept: float, lam: float, rescale: str) -> None:
    """Stage 2 keeps everything (kept_llm = 100%): the projector stage alone, features and logits."""
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=pad, seed=seed, images=images, text_after=after)
    features, slots = catp_stage1(model, inputs, kept, lam, rescale)
    seen: list[torch.Tensor] = []  # the projector's output as the LLM receives it (after policyc's hook)
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        run_and_compare(model, inputs, params(kept, lam, rescale),
                        catp_prefill(eager_copy(model), inputs, kept, lam, rescale), None)
    finally:
        handle.remove()
    assert slots.sum(1).tolist() == [int(features.shape[1] * kept / 100)] * batch * images
    torch.testing.assert_close(seen[0][slots], features[slots], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
@pytest.mark.parametrize(("batch", "pad", "images"), [(1, 0, 2), (2, 1, 3), (2, 2, 1)])
@pytest.mark.parametrize(("seed", "layer", "lam2", "kept_llm"), [(0, 1, 0.6, 36.3), (1, 2, 0.0, 50), (2, 1, 2.0, 20)])
def test_catp_equals_the_plain_reference_through_both_stages(build, batch: int, pad: int, images: int,  # type: ignore[no-untyped-def]
                                                             seed: int, layer: int, lam2: float,
                                                             kept_llm: float) -> None:
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=pad, seed=seed, images=images, text_after=4)
    expected = catp_prefill(eager_copy(model), inputs, 61.1, layer=layer, lam2=lam2, kept_llm=kept_llm)
    run_and_compare(model, inputs, params(61.1, 0.7, "shift", layer, lam2, kept_llm), expected, layer)


def test_the_paired_text_changes_what_catp_keeps() -> None:
    model = tiny_llava_clip(seed=5)
    pixel_values = make_inputs(model, seed=5)["pixel_values"]
    kept = []
    for seed in (5, 6, 7):
        inputs = make_inputs(model, seed=seed, text_after=6)
        inputs["pixel_values"] = pixel_values  # one image, different paired texts
        _, expected = catp_stage1(model, inputs, 50, lam=2.0)
        compiled = compile_model(model, "catp", params(50, 2.0, "shift"))
        try:
            with torch.no_grad():
                model(**inputs)
            assert torch.equal(compiled.runtime.image_slots[0], expected)
        finally:
            compiled.remove()
        kept.append(expected)
    assert not all(torch.equal(kept[0], k) for k in kept[1:])


def test_facility_outside_projector_output_fails_at_check() -> None:
    source = "policy p {\n  stage llm.layer[1] {\n    keep facility 50% of vision by hidden\n  }\n}\n"
    with pytest.raises(PolicyError, match="facility"):
        check_source(source, "p.tokpol")


def test_facility_with_an_unknown_rescale_names_the_choices() -> None:
    source = "policy p {\n  stage projector.output {\n    keep facility(rescale=half) 50% of vision by hidden\n  }\n}\n"
    with pytest.raises(PolicyError, match="shift"):
        check_source(source, "p.tokpol")


def test_attention_of_the_previous_layer_at_layer_0_fails_at_compile_time() -> None:
    with pytest.raises(PolicyError, match="layer 0 has none"):
        compile_model(tiny_llava_clip(), "catp", params(50, 0.7, "shift", layer=0))


def test_attention_of_the_previous_layer_is_refused_by_the_graph_backends() -> None:
    source = ("policy p {\n  stage llm.layer[1] {\n    keep top 50% of vision by attention(last -> vision) - "
              "attention(last -> vision, layer=previous)\n  }\n}\n")
    with pytest.raises(PolicyError, match=r"attention\(layer=previous\) is not implemented by the fx backend"):
        compile_model(tiny_llava_clip(), check_source(source, "p.tokpol")[0], backend="fx")


def test_catp_fails_at_compile_time_where_projector_stages_have_no_question() -> None:
    with pytest.raises(PolicyError, match="facility needs the question, which mistral3's projector stages"):
        compile_model(tiny_mistral3(), "catp", {"layer": ir.Number(value=1)})


def test_policyc_run_catp_on_the_embedded_default() -> None:
    result = CliRunner().invoke(main, ["run", "catp", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "new tokens" in result.output
    row = next(line for line in result.output.splitlines() if "projector.output" in line)
    assert row.split("│")[5].strip() == "87"  # floor(144 · 61.1%)
