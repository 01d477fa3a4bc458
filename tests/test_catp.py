"""CATP's Stage 1 (`policies/catp.tokpol`, the `facility` selector) against the plain reference in
tests/reference/catp.py: the same kept image slots exactly, projected features and the LLM's logits within 1e-5,
over seeds, shares, lam, both rescales, CLIP and SigLIP, batches of 1 and 2 (left padding) and the multi-image
prompts of in-context learning (each image aligned with its own paired text, the last with none); and
`policyc run catp` on the embedded default."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from reference.catp import catp_stage1, kept_logits
from tiny_mistral3 import tiny_mistral3
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.cli import main
from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model


def params(kept: float, lam: float, rescale: str) -> dict[str, ir.Expr]:
    return {"kept": ir.Percent(value=kept), "lam": ir.Number(value=lam), "rescale": ir.Name(id=rescale)}


@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
@pytest.mark.parametrize(("batch", "pad", "images", "after"), [(1, 0, 1, 5), (2, 2, 1, 5), (2, 1, 3, 4),
                                                                (1, 0, 4, 0)])
@pytest.mark.parametrize(("seed", "kept", "lam", "rescale"), [(0, 61.1, 0.7, "shift"), (1, 50, 2.0, "shift"),
                                                              (2, 30, 0.7, "clamp"), (3, 80, 0.0, "shift")])
def test_catp_stage1_equals_the_plain_reference(build, batch: int, pad: int, images: int, after: int,  # type: ignore[no-untyped-def]
                                                seed: int, kept: float, lam: float, rescale: str) -> None:
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=pad, seed=seed, images=images, text_after=after)
    features, expected = catp_stage1(model, inputs, kept, lam, rescale)
    expected_logits = kept_logits(model, inputs, features, expected)
    compiled = compile_model(model, "catp", params(kept, lam, rescale))
    seen: list[torch.Tensor] = []  # the projector's output as the LLM receives it (after policyc's hook)
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        handle.remove()
        slots, _ = compiled.runtime.image_slots
        assert torch.equal(slots, expected)
        assert slots.sum(1).tolist() == [int(features.shape[1] * kept / 100)] * batch * images
        torch.testing.assert_close(seen[0][slots], features[expected], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape == (batch, inputs["input_ids"].shape[1] + 2)
        assert torch.equal(compiled.runtime.image_slots[0], expected)
    finally:
        handle.remove()
        compiled.remove()


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


def test_catp_fails_at_compile_time_where_projector_stages_have_no_question() -> None:
    with pytest.raises(PolicyError, match="facility needs the question, which mistral3's projector stages"):
        compile_model(tiny_mistral3(), "catp")


def test_policyc_run_catp_on_the_embedded_default() -> None:
    result = CliRunner().invoke(main, ["run", "catp", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert "new tokens" in result.output
    row = next(line for line in result.output.splitlines() if "projector.output" in line)
    assert row.split("│")[5].strip() == "87"  # floor(144 · 61.1%)
