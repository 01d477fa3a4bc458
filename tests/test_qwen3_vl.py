"""Qwen3-VL and Qwen3-VL-MoE: the adapter, the identity policy bit-exact at every generate() step, DeepStack features
following the kept rows (FastV against a plain reference that drops rows and their DeepStack features, DivPrune at
projector.output against a shorter prompt), and padded batches equal to single runs."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_identity_is_bit_exact
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs
from tiny_qwen3_vl import tiny_qwen3_vl

from policyc.models import adapt
from policyc.models.qwen3_vl import Qwen3VLAdapter

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens
MOE = (False, True)


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
def test_the_adapter_finds_the_parts(moe: bool) -> None:
    model = tiny_qwen3_vl(moe=moe)
    adapter = adapt(model)
    assert isinstance(adapter, Qwen3VLAdapter) and adapter.family == "qwen3_vl"
    tower = model.model.visual
    assert adapter.decoder_layers is model.model.language_model.layers and len(adapter.decoder_layers) == 4
    assert adapter.vision_layers is tower.blocks and adapter.projector is tower.merger
    assert adapter.deepstack_mergers == tuple(tower.deepstack_merger_list) and adapter.deepstack_layers == 3
    assert (adapter.rope, adapter.has_cls, adapter.tokens_per_image, adapter.patch_grid) == ("mrope", False, None, None)
    assert adapter.visual_ids == (QWEN_IMAGE_ID, 122) and adapter.encoder_patches_per_token == 4
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 16)
    assert adapter.image_sizes(make_qwen_inputs(grids=GRIDS)["input_ids"][0]) == [16, 8]
    assert "family qwen3_vl" in adapter.describe() and "DeepStack after LLM layers 0..2" in adapter.describe()


def test_sample_inputs_are_what_the_model_takes() -> None:
    model = tiny_qwen3_vl()
    inputs = adapt(model).sample_inputs()
    assert inputs["pixel_values"].shape == (64, 3 * 2 * 4 * 4) and inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert int(inputs["mm_token_type_ids"].sum()) == 16 == int((inputs["input_ids"] == QWEN_IMAGE_ID).sum())
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(moe: bool, batch: int) -> None:
    assert_identity_is_bit_exact(tiny_qwen3_vl(moe=moe), make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2))
