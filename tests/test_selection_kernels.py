"""policyc's selection kernels (policyc/kernels/top_ranked.py, kept_rows.py, bipartite_match.py) against plain
Python written from their definitions, eager and fused by torch.compile (inductor's C++ backend on CPU); fused, they
compile nothing new for other lengths and kept counts; ToMe compiled with the fused matching merges and generates
what it does eagerly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_inputs, tiny_llava_clip
from torch._dynamo.utils import counters

import policyc
from policyc.kernels import KERNELS, set_fusion


@pytest.fixture(autouse=True)
def eager_by_default() -> None:
    set_fusion("auto")
    yield
    set_fusion("auto")


def plain_top(score: list[float], among: list[bool], count: int) -> set[int]:
    """The `count` best candidates: highest score first, then the earlier position."""
    candidates = [i for i, a in enumerate(among) if a]
    return set(sorted(candidates, key=lambda i: (-score[i], i))[:count])


def plain_kept_rows(keep: list[bool], width: int) -> list[int]:
    """The kept rows, then the earliest dropped ones until there are `width`, in the original order."""
    dropped = [i for i, k in enumerate(keep) if not k]
    return sorted([i for i, k in enumerate(keep) if k] + dropped[: width - sum(keep)])


def top_case(seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores with ties and -inf over [2, 3, L], about half the tokens candidates, counts from 0 to past L."""
    generator = torch.Generator().manual_seed(seed)
    score = torch.randint(0, 5, (2, 3, length), generator=generator).float()
    score[torch.rand(score.shape, generator=generator) < 0.1] = float("-inf")
    among = torch.rand(score.shape, generator=generator) < 0.5
    counts = torch.randint(0, length + 2, (2, 3), generator=generator)
    return score, among, counts


def kept_case(seed: int, length: int) -> tuple[torch.Tensor, int]:
    generator = torch.Generator().manual_seed(seed)
    keep = torch.rand(3, length, generator=generator) < 0.4
    keep[0] = seed % 2 == 1 or keep[0]  # odd seeds: row 0 keeps everything
    return keep, min(length, int(keep.sum(1).max()) + seed % 3)  # room for fillers in every row


def match_case(seed: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    metric = torch.nn.functional.normalize(torch.randn(2, length, 8, generator=generator), dim=-1)
    metric[:, 2] = metric[:, 0]  # A rows 0 and 1 tie: ranked in their order
    sources = torch.rand(2, length, generator=generator) < 0.7
    targets = torch.rand(2, length, generator=generator) < 0.7
    targets[0, 1::2] = False  # sample 0: no B row may receive
    return metric, sources, targets


def check_top(case: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    score, among, counts = case
    got = KERNELS["top_ranked"](score, among, counts)
    for b, h in torch.cartesian_prod(torch.arange(2), torch.arange(3)).tolist():
        expected = plain_top(score[b, h].tolist(), among[b, h].tolist(), int(counts[b, h]))
        assert set(got[b, h].nonzero().flatten().tolist()) == expected


def check_kept(case: tuple[torch.Tensor, int]) -> None:
    keep, width = case
    got = KERNELS["kept_rows"](keep, width)
    assert got.shape == (3, width)
    assert got.tolist() == [plain_kept_rows(row, width) for row in keep.tolist()]


def check_match(case: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    metric, sources, targets = case
    best, match, order = KERNELS["bipartite_match"](metric, sources, targets)
    a_rows, b_rows = range(0, metric.shape[1], 2), range(1, metric.shape[1], 2)
    for b in range(2):
        for i, a in enumerate(a_rows):
            allowed = [j for j, t in enumerate(b_rows) if bool(sources[b, a]) and bool(targets[b, t])]
            if not allowed:
                assert best[b, i] == float("-inf")
                continue
            cosines = [float(metric[b, a] @ metric[b, b_rows[j]]) for j in allowed]
            top = max(cosines)
            assert abs(float(best[b, i]) - top) < 1e-5
            assert abs(cosines[allowed.index(int(match[b, i]))] - top) < 1e-5  # a best match (any of a tie)
        ranked = best[b, order[b]]
        assert bool((ranked[:-1] >= ranked[1:]).all())  # best matched first
        tied = ranked[:-1] == ranked[1:]
        assert bool((order[b, :-1][tied] < order[b, 1:][tied]).all())  # ties keep the earlier A row first


@pytest.mark.parametrize("fused", [False, True])
def test_top_ranked_keeps_the_best_candidates_ties_first_come(fused: bool) -> None:
    set_fusion("on" if fused else "off")
    for seed, length in [(0, 1), (1, 7), (2, 30), (3, 64)]:
        check_top(top_case(seed, length))


@pytest.mark.parametrize("fused", [False, True])
def test_kept_rows_are_the_kept_rows_then_the_earliest_fillers_in_order(fused: bool) -> None:
    set_fusion("on" if fused else "off")
    for seed, length in [(0, 1), (1, 9), (2, 40), (5, 100)]:
        check_kept(kept_case(seed, length))


@pytest.mark.parametrize("fused", [False, True])
def test_bipartite_match_is_each_a_rows_best_allowed_b_row(fused: bool) -> None:
    set_fusion("on" if fused else "off")
    for seed, length in [(0, 6), (1, 11), (2, 40)]:
        check_match(match_case(seed, length))


def test_fused_selection_kernels_compile_nothing_new_for_other_lengths_and_counts() -> None:
    set_fusion("on")
    torch._dynamo.reset()
    for seed, length in [(0, 9), (1, 20)]:  # the first call compiles; the second marks the sizes dynamic
        check_top(top_case(seed, length)), check_kept(kept_case(seed, length)), check_match(match_case(seed, length))
    graphs = counters["stats"]["unique_graphs"]
    for seed, length in [(2, 33), (3, 71), (4, 150)]:
        check_top(top_case(seed, length)), check_kept(kept_case(seed, length)), check_match(match_case(seed, length))
    assert counters["stats"]["unique_graphs"] == graphs


def test_tome_merges_the_same_tokens_with_the_fused_matching() -> None:
    """ToMe in the encoder (bipartite_match). FastV and H2O fused (tests/test_kernels.py) run top_ranked and kept_rows
    fused too: FastV over the prompt's rows, H2O over the cache slots ([B, Hkv, n])."""
    results = []
    for mode in ("off", "on"):
        set_fusion(mode)  # type: ignore[arg-type]
        model = tiny_llava_clip(seed=4)
        inputs = make_inputs(model, batch=2, pad_left=2, seed=4)
        policyc.compile(model, "tome", r=3)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        results.append((out.sequences, out.logits[0], model.policyc.images.encoder_rows.clone()))
        model.policyc.remove()
    assert KERNELS["bipartite_match"]._compiled is not None and not KERNELS["bipartite_match"]._broken
    (tokens, logits, rows), (fused_tokens, fused_logits, fused_rows) = results
    assert torch.equal(tokens, fused_tokens) and torch.equal(rows, fused_rows)  # rows each encoder layer ran on
    torch.testing.assert_close(fused_logits, logits, rtol=0, atol=1e-5)
