"""SparseVLM v1.5's token recycling (`merge cluster(...) of dropped by hidden`, algorithms.md §9): the DPC-kNN
clustering on hand-checked examples, then the standard-library policy against the plain reference in
tests/reference/sparsevlm.py (the same kept rows, the same clusters, greedy tokens and logits within 1e-5 in fp32,
one sample and left-padded batches of two), and end-to-end `generate()`."""

from __future__ import annotations

from importlib.resources import files

import pytest
import torch
from generation import assert_rows_equal_single_runs
from policyc.passes.merge_cluster import Cluster, cluster_count, dpc_knn, recycled_count
from reference.sparsevlm import dpc_knn as reference_dpc_knn
from reference.sparsevlm import sparsevlm_generate
from tiny_models import _llava, make_inputs, tiny_llava_clip
from transformers import CLIPVisionConfig

import policyc
from policyc.lang import ir

STEPS = 5
PRUNING = [2, 6, 15]


def test_dpc_knn_finds_the_two_groups_of_a_hand_checked_example() -> None:
    # With knn=3 the densities are exp(-v), v = 0.363, 0.193, 0.497, 0.387, 0.173, 0.453: 10.4 is the densest
    # (delta = the largest distance, 11), 0.3 the densest of its group (delta 10.1); the rest lie 0.3 to 0.7 from
    # a denser token. delta * rho: 0.209, 8.32, 0.426, 0.272, 9.25, 0.381.
    x = torch.tensor([[0.0], [0.3], [1.0], [10.0], [10.4], [11.0]])
    centres, assign = dpc_knn(x, 2, 3)
    assert centres.tolist() == [4, 1]
    assert assign.tolist() == [1, 1, 1, 0, 0, 0]
    centres, assign = dpc_knn(x, 3, 3)  # the third centre: 1.0 (0.426); 0.0 is nearer 0.3 than 1.0
    assert centres.tolist() == [4, 1, 2]
    assert assign.tolist() == [1, 1, 2, 0, 0, 0]
    # Distances are divided by sqrt(C): the same points repeated over 4 channels cluster the same way.
    assert dpc_knn(x.repeat(1, 4), 2, 3)[0].tolist() == [4, 1]


def test_dpc_knn_breaks_ties_towards_the_earlier_token() -> None:
    # knn=1: every density is exp(0); the earlier token counts as denser, so token 0 leads (delta = 5), token 1
    # sits on it (delta 0) and token 2 is 5 from its nearest denser token: scores 5, 0, 5.
    x = torch.tensor([[0.0], [0.0], [5.0]])
    assert [t.tolist() for t in dpc_knn(x, 1, 1)] == [[0], [0, 0, 0]]
    assert [t.tolist() for t in dpc_knn(x, 2, 1)] == [[0, 2], [0, 0, 1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpc_knn_equals_the_reference_on_random_tokens(seed: int) -> None:
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(seed))
    for clusters, knn in [(5, 5), (1, 1), (8, 3), (40, 40)]:
        centres, assign = dpc_knn(x, clusters, knn)
        expected_centres, owner = reference_dpc_knn(x, clusters, knn)
        assert centres.tolist() == expected_centres
        assert centres[assign].tolist() == owner


def test_recycled_and_cluster_counts_follow_sparsevlm() -> None:
    thirty = ir.Percent(value=30)
    assert [recycled_count(thirty, n) for n in (0, 1, 6, 10, 276)] == [0, 1, 2, 4, 83]  # int(0.3 n) + 1
    assert recycled_count(ir.Percent(value=0), 50) == 0  # recycling off
    assert recycled_count(ir.Percent(value=100), 7) == 7
    ten = ir.Percent(value=10)
    assert [cluster_count(ten, m) for m in (1, 9, 10, 83)] == [1, 1, 2, 9]  # int(m / 10) + 1
    assert cluster_count(ir.Number(value=5), 3) == 3


def tiny_llava_64(seed: int) -> torch.nn.Module:
    """The tiny CLIP LLaVA with a 64x64 image (64 image tokens) and 16 LLM layers (pruning at 2, 6 and 15)."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                              image_size=64, patch_size=8, projection_dim=32)
    return _llava(vision, seed, 16, "default", -2)


def generate(model: torch.nn.Module, inputs: dict, **kwargs: object):  # type: ignore[no-untyped-def]
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, **kwargs)


def recorded_clusters(monkeypatch: pytest.MonkeyPatch) -> list[list[dict[int, list[int]]]]:
    """Records, per call of the real `Cluster.fold`, each sample's clusters {centre position: member positions}."""
    calls: list[list[dict[int, list[int]]]] = []
    fold = Cluster.fold

    def recording(self, merge, rows, ctx):  # type: ignore[no-untyped-def]
        folding = fold(self, merge, rows, ctx)
        kept, samples = ctx.state.kept, []
        for b in range(kept.shape[0]):
            groups: dict[int, list[int]] = {}
            for j in folding.fused[b].nonzero().flatten().tolist():
                groups.setdefault(int(kept[b, folding.into[b, j]]), []).append(int(kept[b, j]))
            samples.append({centre: sorted(members) for centre, members in groups.items()})
        calls.append(samples)
        return folding

    monkeypatch.setattr(Cluster, "fold", recording)
    return calls


CASES = [  # (seed, batch, image tokens, budgets, recycle %, clusters policy text or None for the library's)
    (0, 1, 16, [10, 6, 3], 30, None),
    (1, 2, 16, [10, 6, 3], 100, None),
    (2, 2, 64, [40, 20, 8], 30, None),
    (3, 1, 64, [40, 20, 8], 100, None),
    (4, 2, 64, [36, 24, 12], 100, 30),
    (5, 2, 64, [30, 12, 6], 60, 40),
]


@pytest.mark.parametrize(("seed", "batch", "tokens", "budgets", "recycle", "clusters"), CASES)
def test_recycling_equals_the_reference(monkeypatch: pytest.MonkeyPatch, seed: int, batch: int, tokens: int,
                                        budgets: list[int], recycle: int, clusters: int | None) -> None:
    model = tiny_llava_clip(seed=seed, num_llm_layers=16) if tokens == 16 else tiny_llava_64(seed)
    inputs = make_inputs(model, batch=batch, pad_left=3, seed=seed, text_after=8)
    expected = sparsevlm_generate(model, **inputs, pruning=PRUNING, budgets=budgets, max_new_tokens=STEPS,
                                  recycle=recycle, clusters=10 if clusters is None else clusters)
    calls = recorded_clusters(monkeypatch)
    params = {"early": budgets[0], "middle": budgets[1], "late": budgets[2], "recycle": f"{recycle}%"}
    if clusters is None:
        compiled = policyc.compile(model, "sparsevlm", params).policyc
    else:
        library = files("policyc.policies").joinpath("sparsevlm.tokpol").read_text(encoding="utf-8")
        source = library.replace("merge cluster(", f"merge cluster(clusters={clusters}%, ")
        compiled = policyc.compile(model, policyc.parse(source), params).policyc
    result = generate(model, inputs)
    assert len(calls) == len(PRUNING)  # once per pruning layer, in the prefill only
    for row, reference in enumerate(expected):
        pad = int((inputs["attention_mask"][row] == 0).sum())
        for stage in range(len(PRUNING)):
            assert {c - pad: [m - pad for m in ms] for c, ms in calls[stage][row].items()} == reference.clusters[stage]
            assert len(reference.clusters[stage]) >= 1
        for stage, layer in enumerate([3, 7]):
            rows = compiled.runtime.kept_at_layer[layer][row]
            assert torch.equal(rows[rows >= pad] - pad, reference.kept[stage])
        kept = compiled.kept_positions[row]
        assert torch.equal(kept[kept >= pad] - pad, reference.kept[2])
    torch.testing.assert_close(result.sequences[:, inputs["input_ids"].shape[1]:],
                               torch.stack([r.tokens for r in expected]), rtol=0, atol=0)
    for step, logits in enumerate(torch.stack([torch.stack(r.logits) for r in expected]).unbind(1)):
        torch.testing.assert_close(result.scores[step], logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_the_standard_library_policy_generates_in_a_padded_batch_as_each_sample_alone(cache: str) -> None:
    model = tiny_llava_64(seed=6)
    inputs = make_inputs(model, batch=2, pad_left=3, seed=6, text_after=8)
    compiled = policyc.compile(model, "sparsevlm", early=40, middle=20, late=8).policyc  # recycle=30%
    kwargs = {"cache_implementation": "static"} if cache == "static" else {}
    batched = generate(model, inputs, **kwargs)
    image = inputs["input_ids"] == model.config.image_token_id
    # 64 -> keep 40, recycle int(0.3 * 24) + 1 = 8 of the dropped into int(8 / 10) + 1 = 1: 41 image tokens;
    # then 41 -> 20 + 1 (7 recycled) and 21 -> 8 + 1 (4 recycled)
    for layer, count in [(3, 41), (7, 21)]:
        rows = compiled.runtime.kept_at_layer[layer]
        assert torch.gather(image, 1, rows).sum(1).tolist() == [count, count]
    assert [int(image[b, compiled.kept_positions[b]].sum()) for b in range(2)] == [9, 9]
    assert_rows_equal_single_runs(lambda i: generate(model, i, **kwargs), inputs, batched, STEPS)


def test_recycling_changes_what_the_model_generates_and_recycle_0_percent_turns_it_off() -> None:
    model = tiny_llava_64(seed=7)
    inputs = make_inputs(model, batch=1, seed=7, text_after=8)
    budgets = {"early": 30, "middle": 12, "late": 6}
    recycled = generate(policyc.compile(model, "sparsevlm", recycle="100%", **budgets), inputs)
    plain = generate(policyc.compile(model, "sparsevlm", recycle="0%", **budgets), inputs)
    without = generate(policyc.compile(model, policyc.parse(
        files("policyc.policies").joinpath("sparsevlm.tokpol").read_text(encoding="utf-8").replace(
            "    merge cluster(share=recycle, rank=relevance) of dropped by hidden\n", "")), budgets), inputs)
    assert torch.equal(plain.sequences, without.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, without.scores, strict=True))
    assert not all(torch.allclose(a, b, atol=1e-3) for a, b in zip(recycled.scores, plain.scores, strict=True))


@pytest.mark.parametrize("by", ["hidden", "keys", "keys(layer=next)"])
def test_merge_cluster_of_alive_tokens_in_the_llm(by: str) -> None:
    """Without `share`, every token of SET is clustered: 16 image tokens become 4 (their clusters' means)."""
    model = tiny_llava_clip(seed=8)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=8)
    compiled = policyc.compile(model, policyc.parse(f"""policy p {{
      stage llm.layer[1] {{ merge cluster(clusters=4) of vision by {by}
                           positions compact }}
    }}""")).policyc
    batched = generate(model, inputs)
    image = inputs["input_ids"] == model.config.image_token_id
    assert torch.gather(image, 1, compiled.runtime.kept_at_layer[2]).sum(1).tolist() == [4, 4]
    assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, batched, STEPS)


def test_recycling_when_the_samples_of_a_batch_drop_different_counts() -> None:
    """A threshold drops a different number of tokens per sample; each recycles its own dropped tokens into two
    clusters, and the batch (fillers masked) generates what each sample generates alone."""
    model = tiny_llava_clip(seed=9)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=9)
    compiled = policyc.compile(model, policyc.parse("""policy p {
      stage llm.layer[1] {
        drop vision where attention(last -> vision) < mean(attention(last -> vision))
        merge cluster(clusters=2) of dropped by hidden
        positions cache_length
      }
    }""")).policyc
    batched = generate(model, inputs)
    assert compiled.runtime.live_at_layer[2] is not None  # the samples kept different counts
    assert_rows_equal_single_runs(lambda i: generate(model, i), inputs, batched, STEPS)
