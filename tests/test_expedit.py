"""Expedit's token clustering (policies/expedit.tokpol: the `soft_cluster` merge) against the plain reference
tests/reference/expedit.py: the cluster tokens in the slots of their cells' earliest patches exactly, projected
features and the LLM's last logits within 1e-5, over seeds, cluster grids, windows and temperatures, CLIP (CLS
carried) and SigLIP, batches of 1 and a left-padded 2; and its clear errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from pre_llm_checks import assert_compiled_equals
from reference.expedit import expedit_image_features, reconstruction, soft_clusters
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source, ir
from policyc.runtime import compile_model

Build = Callable[..., torch.nn.Module]


def number(value: int | float) -> ir.Number:
    return ir.Number(value=value)


def wide_clip(seed: int) -> torch.nn.Module:
    return tiny_llava_clip(seed=seed, image_size=48)  # a 6 x 6 patch grid


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("build", "seed", "size", "window", "tau"), [
    (tiny_llava_clip, 0, 2, 5, 0.02),
    (tiny_llava_clip, 1, 3, 3, 0.5),
    (tiny_llava_siglip, 2, 2, 3, 0.1),
    (wide_clip, 3, 4, 3, 0.05),
    (wide_clip, 4, 3, 1, 0.02),
])
def test_expedit_equals_the_plain_reference(build: Build, seed: int, size: int, window: int, tau: float,
                                            batch: int) -> None:
    model = build(seed)
    inputs = make_inputs(model, batch=batch, seed=seed, pad_left=2)
    expected, filled = expedit_image_features(model, inputs["pixel_values"], 0, size, window, 4, tau)
    params = {"size": number(size), "window": number(window), "iters": number(4), "tau": number(tau)}
    kept = assert_compiled_equals(model, check_source(EXPEDIT, "expedit.tokpol")[0], params, inputs, expected,
                                  filled)
    assert kept.sum(1).tolist() == [size * size] * batch


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(("build", "seed", "size", "k"), [
    (tiny_llava_clip, 0, 2, 20), (tiny_llava_siglip, 1, 3, 2), (wide_clip, 2, 3, 4),
])
def test_expedit_reconstruction_equals_the_plain_reference(build: Build, seed: int, size: int, k: int,
                                                           batch: int) -> None:
    """reconstruct=on: every patch reaches the projector, rebuilt from the clusters (k, tau_r written into the
    policy; tau_r = 0.5 keeps the weights away from underflow on the tiny towers' feature scale)."""
    model = build(seed)
    inputs = make_inputs(model, batch=batch, seed=seed, pad_left=2)
    expected, filled = expedit_image_features(model, inputs["pixel_values"], 0, size, 3, 3, 0.1, reconstruct=True,
                                              k=k, tau_r=0.5)
    assert bool(filled.all())
    text = EXPEDIT.replace("reconstruct=reconstruct)", f"reconstruct=reconstruct, k={k}, tau_r=0.5)")
    params = {"size": number(size), "window": number(3), "iters": number(3), "tau": number(0.1),
              "reconstruct": ir.Name(id="on")}
    assert_compiled_equals(model, check_source(text, "expedit.tokpol")[0], params, inputs, expected, filled,
                           compresses=False)


def test_reconstruction_keeps_the_top_k_clusters_per_patch_with_unit_rows() -> None:
    torch.manual_seed(1)
    x, clusters = torch.randn(16, 8), torch.randn(4, 8)
    weights = reconstruction(x, clusters, 2, 0.1)
    assert (weights > 0).sum(1).tolist() == [2] * 16
    torch.testing.assert_close(weights.norm(dim=1), torch.ones(16))


def test_a_drop_after_the_clustering_refuses_reconstruction() -> None:
    source = ("policy p {\n  stage encoder.layer[0] {\n    merge soft_cluster(size=2, reconstruct=on) of vision by "
              "hidden\n  }\n  stage encoder.layer[1] {\n    keep top 2 of vision by random(seed=0)\n  }\n}\n")
    model = tiny_llava_clip()
    compiled = compile_model(model, check_source(source, "p.tokpol")[0])
    try:
        with pytest.raises(PolicyError, match="reconstruct=on rebuilds the patches from every cluster token"):
            model(**make_inputs(model))
    finally:
        compiled.remove()


def test_clusters_are_new_tokens_not_any_patch() -> None:
    """Each cluster is a soft combination: it equals neither its slot's patch nor the plain mean of its cell."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    clusters, first = soft_clusters(x, 4, 2, 3, 1, 0.5)
    assert first == [0, 2, 8, 10]
    assert not torch.allclose(clusters, x[first])
    cell_means = x.reshape(2, 2, 2, 2, 8).permute(0, 2, 1, 3, 4).reshape(4, 4, 8).mean(1)
    assert not torch.allclose(clusters, cell_means)


@pytest.mark.parametrize(("body", "message"), [
    ("merge soft_cluster(window=4) of vision by hidden", "needs an odd window"),
    ("keep top 50% of vision by random(seed=0)\n    merge soft_cluster(size=2) of vision by hidden",
     "clusters the whole patch grid"),
    ("protect cls | (top 1 of vision by random(seed=0))\n    merge soft_cluster(size=2) of vision by hidden",
     "clusters the whole patch grid"),
])
def test_soft_cluster_fails_clearly_at_the_merge(body: str, message: str) -> None:
    policy = check_source(f"policy p {{\n  stage encoder.layer[0] {{\n    {body}\n  }}\n}}\n", "p.tokpol")[0]
    model = tiny_llava_clip()
    compiled = compile_model(model, policy)
    try:
        with pytest.raises(PolicyError, match=message):
            model(**make_inputs(model))
    finally:
        compiled.remove()


def test_soft_cluster_needs_features_in_the_checker() -> None:
    with pytest.raises(PolicyError, match="merge 'soft_cluster' needs `by <feature>`"):
        check_source("policy p {\n  stage encoder.layer[0] {\n    merge soft_cluster of vision\n  }\n}\n", "p.tokpol")


EXPEDIT = (Path(__file__).parents[1] / "policies" / "expedit.tokpol").read_text(encoding="utf-8")
