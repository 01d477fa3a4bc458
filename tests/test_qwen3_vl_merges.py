"""Merges on Qwen3-VL fold the DeepStack features alike: a merged token's DeepStack row at every level is the same
combination of its members' rows. Against the plain reference (tests/reference/merge_deepstack.py): VisionZip's
contextual merge at projector.output (`merge nearest`; the standard library's visionzip reads CLS attention at
the encoder's feature layer, which Qwen3-VL's tower has not) and SparseVLM's recycling (`merge cluster`) at LLM
layer 2, a DeepStack layer: the same kept and merged tokens, prefill logits within 1e-5, the same greedy tokens;
a reference that leaves the DeepStack rows unfolded differs. Every projector merge rule (ToMe's size-weighted
average, plain means, VisionZip's add_mean, temporal merging of video frames) folds each DeepStack level as it folds
the tokens. Padded batches equal single runs, dense and MoE."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_batch_equals_single_runs
from reference.merge_deepstack import RowResult, nearest_merge_generate, sparsevlm_generate
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs, qwen_single_row
from tiny_qwen3_vl import make_qwen3_video_inputs, tiny_qwen3_vl

import policyc
from policyc.lang import check_source

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens
SPARSE_GRIDS = ((8, 8), (8, 8))  # 32 image tokens: SparseVLM recycles 12 of the 22 it drops at layer 2, 2 clusters
SPARSE = {"early": 10, "middle": 8, "late": 4, "recycle": "50%"}
STEPS = 4
MOE = (False, True)


def contextual_merge(contextual: int) -> policyc.lang.ir.Policy:
    """VisionZip's contextual merge at projector.output: every image's tokens fold into `contextual` targets taken
    at a uniform stride, each target becoming itself plus the mean of the tokens nearest to it."""
    return check_source(f"""policy contextual_zip {{
  stage projector.output {{
    let targets = stride {contextual} of vision
    merge nearest of vision - targets into targets by hidden
  }}
}}""")[0]


def assert_equals_the_reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                                expected: list[RowResult]) -> torch.Tensor:
    """The compiled `model` keeps the reference's rows (the merged tokens at their groups' slots), its prefill
    logits on them are within 1e-5, and it generates the reference's tokens. Returns the prefill logits."""
    with torch.no_grad():
        logits = model(**inputs).logits
    kept = model.policyc.kept_positions
    assert model.policyc.runtime.state.live() is None  # every row keeps as many tokens: no fillers
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    for row, result in enumerate(expected):
        real = inputs["attention_mask"][row].bool()[kept[row]]
        assert torch.equal(kept[row][real], result.rows)
        assert torch.equal(kept[row][image[row, kept[row]]], result.visual)
        torch.testing.assert_close(logits[row, real], result.logits, rtol=0, atol=1e-5)
    tokens = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    assert tokens.tolist() == [result.tokens for result in expected]
    return logits


def assert_unfolded_differs(logits: torch.Tensor, inputs: dict[str, torch.Tensor], unfolded: list[RowResult]) -> None:
    """The reference whose merged tokens keep their receiver's DeepStack rows only gives other logits."""
    assert max(float((logits[row, -1] - result.logits[-1]).abs().max()) for row, result in enumerate(unfolded)) > 1e-3


@pytest.mark.parametrize(("moe", "seed", "contextual"), [(False, 0, 4), (False, 1, 3), (True, 2, 4)])
@pytest.mark.parametrize("batch", [1, 2])
def test_projector_merge_equals_the_reference(moe: bool, seed: int, contextual: int, batch: int) -> None:
    model = tiny_qwen3_vl(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected = nearest_merge_generate(model, inputs, contextual=contextual, max_new_tokens=STEPS)
    unfolded = nearest_merge_generate(model, inputs, contextual=contextual, max_new_tokens=0, fold=False)
    policyc.compile(model, contextual_merge(contextual))
    logits = assert_equals_the_reference(model, inputs, expected)
    assert_unfolded_differs(logits, inputs, unfolded)


@pytest.mark.parametrize(("moe", "seed"), [(False, 0), (False, 3), (True, 1)])
@pytest.mark.parametrize("batch", [1, 2])
def test_sparsevlm_recycling_in_a_deepstack_layer_equals_the_reference(moe: bool, seed: int, batch: int) -> None:
    """The standard library's SparseVLM on 16 layers (pruning after layers 2, 6 and 15): its first recycling
    merges after layer 2, before DeepStack's level 2 is added."""
    model = tiny_qwen3_vl(seed=seed, num_llm_layers=16, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=SPARSE_GRIDS, pad_left=2, seed=seed)
    expected = sparsevlm_generate(model, inputs, pruning=[2, 6, 15], budgets=[10, 8, 4], share=50,
                                  max_new_tokens=STEPS)
    unfolded = sparsevlm_generate(model, inputs, pruning=[2, 6, 15], budgets=[10, 8, 4], share=50,
                                  max_new_tokens=0, fold=False)
    policyc.compile(model, "sparsevlm", **SPARSE)
    logits = assert_equals_the_reference(model, inputs, expected)
    assert_unfolded_differs(logits, inputs, unfolded)


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
@pytest.mark.parametrize(("policy", "params", "layers", "grids"), [
    (contextual_merge(4), {}, 4, GRIDS),
    ("sparsevlm", SPARSE, 16, SPARSE_GRIDS),
    ("visiondrop_llm", {"early": 8, "middle": 6, "late": 4}, 4, GRIDS),  # merges after layers 0, 1, 2: every level
], ids=["contextual", "sparsevlm", "visiondrop_llm"])
def test_padded_batches_equal_single_runs(moe: bool, policy: object, params: dict, layers: int,
                                          grids: tuple[tuple[int, int], ...]) -> None:
    inputs = make_qwen_inputs(batch=2, grids=grids, pad_left=2, seed=5)
    assert_batch_equals_single_runs(tiny_qwen3_vl(seed=5, num_llm_layers=layers, moe=moe), policy, params, inputs,
                                    qwen_single_row, drops=True)


PROJECTOR_MERGES = {
    "bipartite": "merge bipartite(r=4) of vision by hidden",  # ToMe: size-weighted averages
    "nearest_mean": "let targets = stride 3 of vision\n"
                    "    merge nearest(combine=mean) of vision - targets into targets by hidden",
    "nearest_add_mean": "let targets = stride 5 of vision\n"
                        "    merge nearest of vision - targets into targets by hidden",
    "temporal": "merge temporal(threshold=0.0) of vision by hidden",  # on videos: each frame into the one before
}


@pytest.mark.parametrize("merge", PROJECTOR_MERGES, ids=list(PROJECTOR_MERGES))
def test_projector_merges_fold_every_deepstack_level_as_the_tokens(merge: str) -> None:
    """With each DeepStack level set to (k + 1) x the tower's merged tokens, every merge rule is linear, so at the
    LLM's input each visual position's level-k row must be (k + 1) x its (merged) token, which some merges changed."""
    model = tiny_qwen3_vl(seed=4)
    videos = merge == "temporal"
    inputs = make_qwen3_video_inputs(batch=2, videos=((4, 4, 8),), pad_left=2, seed=4) if videos else \
        make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=4)
    tower, text_model = model.model.visual, model.model.language_model

    def levels_of_the_tokens(module: torch.nn.Module, args: tuple, output: object) -> object:
        output.deepstack_features = [output.pooler_output * (k + 1) for k in range(len(output.deepstack_features))]
        return output

    seen: dict[str, object] = {}
    tower.register_forward_hook(levels_of_the_tokens)  # before policyc's own hook on the tower
    text_model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
        unmerged = seen["inputs_embeds"][seen["visual_pos_masks"]]
        policyc.compile(model, check_source(f"policy p {{\n  stage projector.output {{\n    {PROJECTOR_MERGES[merge]}"
                                            "\n  }\n}")[0])
        model(**inputs)
    tokens = seen["inputs_embeds"][seen["visual_pos_masks"]]
    assert (tokens - unmerged).abs().amax(-1).gt(1e-4).sum() >= 4  # merged tokens took new values
    assert len(seen["deepstack_visual_embeds"]) == 3
    for k, level in enumerate(seen["deepstack_visual_embeds"]):
        torch.testing.assert_close(level, tokens * (k + 1), rtol=1e-6, atol=1e-5)
