"""GTP-ViT (`policies/gtp_vit.tokpol`: `merge propagate` scored by `mixed_attention`) against the plain reference
`tests/reference/gtp_vit.py` on the tiny CLIP LLaVA: the same kept image slots, projected features and LLM logits
within 1e-5, over seeds, budgets, propagation weights, the three graphs and token scale, batches of 1 and a padded 2.
"""

from __future__ import annotations

import pytest
import torch
from pre_llm_checks import assert_compiled_equals, literal_params
from reference.gtp_vit import gtp_image_features, gtp_last_logits
from tiny_models import make_inputs, tiny_llava_clip

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.runtime import compile_model


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("seed", "r", "alpha", "graph", "neighbours", "scale"), [
    (0, 2, 0.1, "mixed", 8, "true"), (1, 3, 0.3, "spatial", 8, "true"), (2, 4, 0.2, "semantic", 3, "false"),
    (3, 1, 0.5, "mixed", 4, "false")])
def test_gtp_vit_equals_the_plain_reference(batch: int, seed: int, r: int, alpha: float, graph: str, neighbours: int,
                                            scale: str) -> None:
    model = tiny_llava_clip(seed=seed)
    inputs = make_inputs(model, batch=batch, pad_left=2, seed=seed)
    settings = {"alpha": alpha, "kind": graph, "neighbours": neighbours, "scale": scale == "true"}
    expected, filled = gtp_image_features(model, inputs["pixel_values"], r, **settings)
    expected_logits = gtp_last_logits(model, inputs, r, **settings)
    assert_compiled_equals(model, "gtp_vit", literal_params(r=r, alpha=alpha, graph=graph, neighbours=neighbours,
                                                             scale=scale), inputs, expected, filled,
                           expected_logits=expected_logits)


def test_propagation_changes_the_kept_tokens_features() -> None:
    """alpha > 0 adds the leaving tokens into their neighbours: not the same as dropping them (alpha = 0)."""
    model = tiny_llava_clip(seed=5)
    pixel_values = make_inputs(model, seed=5)["pixel_values"]
    dropped, kept = gtp_image_features(model, pixel_values, 3, alpha=0.0)
    spread, same = gtp_image_features(model, pixel_values, 3, alpha=0.3)
    both = kept & same
    assert bool(both.any()) and not torch.allclose(dropped[both], spread[both])


def test_propagate_needs_its_score() -> None:
    source = "policy t { stage encoder.layer[*].attention { merge propagate(r=2) of vision } }"
    with pytest.raises(PolicyError, match="score"):
        compile_model(tiny_llava_clip(), check_source(source, "t.tokpol")[0])


def test_propagate_is_refused_where_the_connector_reads_every_patch() -> None:
    """A leaving token lives on in several rows (or none), so no row can stand in for its patch (unmerge families)."""
    from tiny_idefics3 import tiny_idefics3

    with pytest.raises(PolicyError, match="spreads each token over several rows") as error:
        compile_model(tiny_idefics3(), "gtp_vit")
    assert "gtp_vit.tokpol:" in str(error.value)
