"""MMTok (`policies/mmtok.tokpol`, the `cover` selector) against the plain reference in tests/reference/mmtok.py:
the same kept image slots exactly, projected features and the LLM's logits within fp32 tolerance, over seeds,
budgets, CLIP and SigLIP, batches of 1 and 2 (left padding) and two images per prompt; through forward()
and generate(); and `policyc run mmtok` on the embedded default."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from reference.mmtok import mmtok_image_features, text_relevance_keep
from tiny_models import IMAGE_TOKEN_ID, make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.cli import main
from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model

BUILDS = [tiny_llava_clip, tiny_llava_siglip]


@torch.no_grad()
def reference_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], features: torch.Tensor,
                     kept: torch.Tensor) -> torch.Tensor:
    """Last-position logits [B, V] of the unmodified LLM on each prompt, padding removed, whose image runs hold
    only the reference's kept features (one row at a time)."""
    embed = model.get_input_embeddings()
    tokens = features.shape[1]
    image = 0
    logits = []
    for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"], strict=True):
        ids = ids[mask.bool()]
        parts, p = [], 0
        while p < len(ids):
            if int(ids[p]) == IMAGE_TOKEN_ID:
                parts.append(features[image][kept[image]])
                image, p = image + 1, p + tokens
            else:
                parts.append(embed(ids[p : p + 1]))
                p += 1
        hidden = model.model.language_model(inputs_embeds=torch.cat(parts)[None]).last_hidden_state
        logits.append(model.lm_head(hidden[0, -1]))
    return torch.stack(logits)


def params(tokens: int, alpha: float) -> dict[str, ir.Expr]:
    return {"tokens": ir.Number(value=tokens), "alpha": ir.Number(value=alpha)}


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(("batch", "pad", "images"), [(1, 0, 1), (2, 2, 1), (2, 1, 2)])
@pytest.mark.parametrize(("seed", "tokens", "alpha"), [(0, 4, 0.5), (1, 7, 0.5), (2, 10, 1.5), (3, 5, 0.0)])
def test_mmtok_equals_the_plain_reference(build, batch: int, pad: int, images: int, seed: int,  # type: ignore[no-untyped-def]
                                          tokens: int, alpha: float) -> None:
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=pad, seed=seed, images=images, text_after=5)
    features, expected = mmtok_image_features(model, inputs, tokens, alpha)
    expected_logits = reference_logits(model, inputs, features, expected)
    compiled = compile_model(model, "mmtok", params(tokens, alpha))
    seen: list[torch.Tensor] = []  # the projector's output as the LLM receives it (after policyc's hook)
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(**inputs).logits[:, -1]
        handle.remove()
        kept, _ = compiled.runtime.image_slots
        assert torch.equal(kept, expected)
        torch.testing.assert_close(seen[0][kept], features[expected], atol=1e-5, rtol=1e-5)
        assert kept.sum(1).tolist() == [tokens] * batch * images
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (batch, inputs["input_ids"].shape[1] + 3)
        assert torch.equal(compiled.runtime.image_slots[0], expected)  # generate() reads the same question
    finally:
        handle.remove()
        compiled.remove()


@pytest.mark.parametrize("build", BUILDS)
def test_the_question_changes_what_mmtok_keeps_and_no_question_covers_the_image_alone(build) -> None:  # type: ignore[no-untyped-def]
    model = build(seed=4)
    kept = []
    for seed, after in [(4, 6), (5, 6), (4, 0)]:
        inputs = make_inputs(model, seed=seed, text_after=after)
        inputs["pixel_values"] = make_inputs(model, seed=4)["pixel_values"]  # one image, different questions
        _, expected = mmtok_image_features(model, inputs, 5, 0.5)
        compiled = compile_model(model, "mmtok", params(5, 0.5))
        try:
            with torch.no_grad():
                model(**inputs)
            assert torch.equal(compiled.runtime.image_slots[0], expected)
            kept.append(expected)
        finally:
            compiled.remove()
    assert not all(torch.equal(kept[0], k) for k in kept[1:])


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize(("batch", "pad", "images"), [(1, 0, 1), (2, 2, 1), (2, 1, 2)])
@pytest.mark.parametrize(("seed", "tokens", "tau"), [(0, 4, 0.02), (1, 9, 0.1)])
def test_text_relevance_ranks_as_the_reference(build, batch: int, pad: int, images: int, seed: int,  # type: ignore[no-untyped-def]
                                                tokens: int, tau: float) -> None:
    model = build(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=pad, seed=seed, images=images, text_after=5)
    expected = text_relevance_keep(model, inputs, tokens, tau)
    source = (f"policy p {{\n  stage projector.output {{\n    keep top {tokens} of vision by text_relevance(tau={tau})"
              "\n  }\n}\n")
    compiled = compile_model(model, check_source(source, "p.tokpol")[0])
    try:
        with torch.no_grad():
            model(**inputs)
        assert torch.equal(compiled.runtime.image_slots[0], expected)
    finally:
        compiled.remove()


def test_image_features_alone_have_no_question_and_fail_clearly() -> None:
    model = tiny_llava_clip()
    compiled = compile_model(model, "mmtok", params(4, 0.5))
    try:
        inputs = make_inputs(model)
        with torch.no_grad():
            model(**inputs)
        with pytest.raises(PolicyError, match="without input_ids"), torch.no_grad():
            model.model.get_image_features(pixel_values=inputs["pixel_values"])
    finally:
        compiled.remove()
    assert "generate" not in vars(model)  # remove() restored the class's generate()


def test_cover_needs_projector_output_and_words_prompt() -> None:
    source = "policy p {\n  stage projector.output {\n    keep cover(words=keywords) 8 of vision by hidden\n  }\n}\n"
    with pytest.raises(PolicyError, match=r"cover\(words=keywords\) is not implemented"):
        compile_model(tiny_llava_clip(), check_source(source, "p.tokpol")[0])


def test_policyc_run_mmtok_on_the_embedded_default() -> None:
    result = CliRunner().invoke(main, ["run", "mmtok", "--max-new-tokens", "2", "--param", "tokens=16"])
    assert result.exit_code == 0, result.output
    assert "new tokens" in result.output
    row = next(line for line in result.output.splitlines() if "projector.output" in line)
    assert "16" in row.split("│")[5]  # kept
