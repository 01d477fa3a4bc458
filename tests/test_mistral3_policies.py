"""Mistral 3: the standard library's LLM, decode and projector policies (per image, and one budget split across a
prompt's images) generate end to end on a Ministral 3 LLM, and a left-padded batch (rows with images of other sizes
and counts) equals its rows run alone."""

from __future__ import annotations

import pytest
import torch
from family_checks import LLM_POLICIES, assert_batch_equals_single_runs
from tiny_mistral3 import make_mistral3_inputs, single_mistral3, tiny_mistral3

IMAGES = [[(48, 64)], [(32, 48), (64, 32)]]


@pytest.fixture(scope="module")
def deep_model() -> torch.nn.Module:
    """A 16-layer Ministral 3 LLM, so the standard library's layer indices (SparseVLM's 15) exist."""
    return tiny_mistral3(seed=7, num_llm_layers=16, text="ministral3", std=0.02)


POLICIES = [*LLM_POLICIES, ("streamingllm", {"sinks": 4, "window": 16}, False),  # 1-D RoPE: pos-shift applies
            ("divprune", {"ratio": "30%"}, True), ("todre", {"ratio": "30%"}, True),
            ("random_drop", {"ratio": "40%"}, True),
            ("globalcom2_style", {"ratio": "30%"}, True)]  # one budget split across a prompt's images


@pytest.mark.parametrize(("policy", "params", "drops"), POLICIES, ids=[p[0] for p in POLICIES])
def test_stdlib_policies_generate_and_batches_equal_single_runs(deep_model: torch.nn.Module, policy: str,
                                                                params: dict, drops: bool) -> None:
    assert_batch_equals_single_runs(deep_model, policy, params, make_mistral3_inputs(IMAGES, seed=7),
                                    single_mistral3, steps=4, drops=drops)
