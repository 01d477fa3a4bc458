"""Checks shared by the equivalence tests of methods acting before the LLM on LLaVA (tests/test_fopru.py,
tests/test_expedit.py, tests/test_turbo.py, tests/test_ats.py, tests/test_gtp_vit.py): a compiled policy gives the
reference's kept image slots exactly, its projected features and the LLM's last logits within 1e-5, on batches that
may be left-padded, and generates."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tiny_models import IMAGE_TOKEN_ID

from policyc.lang import CheckedPolicy, ir
from policyc.runtime import compile_model


@torch.no_grad()
def image_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """LLaVA's own projected image features [I, N, D], through whatever the model is compiled with."""
    return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))


def literal_params(**values: float | int | str) -> dict[str, ir.Expr]:
    """Policy parameters from Python values: words become names, numbers numbers."""
    return {k: ir.Name(id=v) if isinstance(v, str) else ir.Number(value=v) for k, v in values.items()}


@torch.no_grad()
def reference_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor], features: torch.Tensor,
                     filled: torch.Tensor) -> torch.Tensor:
    """Last-position logits [B, V] of the unmodified LLM on each prompt, unpadded and run alone, whose image run
    holds only the reference's filled slots of `features` [B, N, D] (one image per row), in slot order."""
    embed = model.get_input_embeddings()
    rows = []
    for ids, mask, image, kept in zip(inputs["input_ids"], inputs["attention_mask"], features, filled, strict=True):
        ids = ids[mask.bool()]
        where = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
        start, stop = int(where[0]), int(where[-1]) + 1
        row = torch.cat([embed(ids[:start]), image[kept], embed(ids[stop:])])
        hidden = model.model.language_model(inputs_embeds=row[None]).last_hidden_state
        rows.append(model.lm_head(hidden[0, -1]))
    return torch.stack(rows)


def assert_compiled_equals(model: torch.nn.Module, policy: CheckedPolicy | str, params: Mapping[str, ir.Expr],
                           inputs: dict[str, torch.Tensor], expected: torch.Tensor, filled: torch.Tensor,
                           compresses: bool = True, expected_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Compiles `policy` with `params` and checks it against the reference's `expected` features [I, N, D] and
    `filled` slots [I, N] (fewer than all of them where it `compresses`), and the last logits against
    `expected_logits` [B, V] (default: the unmodified LLM on the reference's features); returns the kept slots."""
    if expected_logits is None:
        expected_logits = reference_logits(model, inputs, expected, filled)
    compiled = compile_model(model, policy, dict(params))
    try:
        with torch.no_grad():
            features = image_features(model, inputs["pixel_values"])
            kept = compiled.images.kept
            assert torch.equal(kept, filled)
            assert kept.sum() > 0 and (kept.sum() < kept.numel() or not compresses)
            torch.testing.assert_close(features[kept], expected[filled], atol=1e-5, rtol=1e-5)
            logits = model(**inputs).logits[:, -1]
        torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-5)
        batch = inputs["input_ids"].shape[0]
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert out.shape == (batch, inputs["input_ids"].shape[1] + 2)
    finally:
        compiled.remove()
    return kept
