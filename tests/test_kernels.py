"""policyc's kernels (policyc/kernels/): each equals a plain computation that materialises what the kernel avoids
(GQA keys copied per query head, the whole L x L attention matrix); fused by torch.compile it gives the same
numbers, reuses its compiled code for other prompt lengths and row counts, and falls back to eager (with a
warning) where compiling fails; a compiled policy selects the same tokens fused or not."""

from __future__ import annotations

import pytest
import torch
from tiny_models import make_inputs, tiny_llava_clip
from torch._dynamo.utils import counters

import policyc
from policyc.kernels import KERNELS, Kernel, column_sums, fused_on, fusion, set_fusion
from policyc.kernels import attention_columns as columns_module


def plain_attention(query: torch.Tensor, key: torch.Tensor, scaling: float, visible: torch.Tensor) -> torch.Tensor:
    """[B, H, q, n] float64: every query row's softmax over the keys it sees (query [B, H, q, d], key
    [B, Hkv, n, d], visible [B, 1 or H, q, n]), keys copied to every query head of their group; all-zero rows
    where a row sees no key."""
    heads = query.shape[1]
    keys = key.double().repeat_interleave(heads // key.shape[1], dim=1)
    logits = query.double() @ keys.transpose(-1, -2) * scaling
    out = torch.zeros_like(logits)
    visible = visible.expand(-1, heads, -1, -1)
    for b, h, r in torch.cartesian_prod(*(torch.arange(s) for s in logits.shape[:3])).tolist():
        seen = visible[b, h, r]
        if bool(seen.any()):
            out[b, h, r, seen] = torch.softmax(logits[b, h, r, seen], dim=-1)
    return out


def random_case(seed: int, heads: int, kv_heads: int, length: int, dtype: torch.dtype = torch.float32,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Post-RoPE-like query [2, H, L, 16], key [2, Hkv, L, 16], and a causal mask with left padding on row 1."""
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(2, heads, length, 16, generator=generator).to(dtype)
    key = torch.randn(2, kv_heads, length, 16, generator=generator).to(dtype)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    padding = torch.ones(2, length, dtype=torch.bool)
    padding[1, :3] = False
    visible = causal[None] & padding[:, None, :] & padding[:, :, None]
    return query, key, visible[:, None]


@pytest.fixture(autouse=True)
def eager_by_default() -> None:
    set_fusion("auto")
    yield
    set_fusion("auto")


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 2), (6, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_rows_equals_the_plain_softmax(heads: int, kv_heads: int, dtype: torch.dtype) -> None:
    query, key, visible = random_case(heads, heads, kv_heads, 11, dtype)
    rows = torch.tensor([[10, 4, 0], [10, 2, 5]])  # row 1's row 2 is padding: it sees no key
    row_visible = torch.gather(visible[:, 0], 1, rows[:, :, None].expand(-1, -1, 11))
    got = KERNELS["attention_rows"](query, key, 0.25, rows, row_visible)
    expected = plain_attention(query.float(), key.float(), 0.25, visible)
    expected = torch.stack([expected[b][:, rows[b]] for b in range(2)])
    assert got.dtype == torch.float32 and got.shape == (2, heads, 3, 11)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    assert bool((got[1, :, 1] == 0).all())


@pytest.mark.parametrize(("heads", "kv_heads", "length", "block"), [(4, 2, 23, 8), (4, 4, 9, 256), (6, 3, 17, 4)])
def test_column_sums_equal_the_plain_matrix_whatever_the_blocks(heads: int, kv_heads: int, length: int, block: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(columns_module, "ROWS_PER_BLOCK", block)
    query, key, visible = random_case(length, heads, kv_heads, length)
    got = column_sums(query, key, 0.3, visible)
    expected = plain_attention(query, key, 0.3, visible).sum(2)  # [B, H, n]
    expected = expected.view(2, kv_heads, heads // kv_heads, length).sum(2)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    # per-head visibility ([B, H, q, n]) as the layers' own masks give it
    per_head = visible.expand(-1, heads, -1, -1).clone()
    per_head[:, 0, :, 0] = False
    torch.testing.assert_close(column_sums(query, key, 0.3, per_head).double(),
                               plain_attention(query, key, 0.3, per_head).sum(2)
                               .view(2, kv_heads, heads // kv_heads, length).sum(2), rtol=0, atol=1e-5)


def test_the_fusion_mode_follows_the_setting_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("POLICYC_FUSED", raising=False)
    assert fusion() == "auto" and not fused_on(cpu) and fused_on(cuda)
    monkeypatch.setenv("POLICYC_FUSED", "1")
    assert fusion() == "on" and fused_on(cpu)
    monkeypatch.setenv("POLICYC_FUSED", "0")
    assert not fused_on(cuda)
    set_fusion("on")  # the call wins over the environment
    assert fused_on(cpu)
    with pytest.raises(ValueError, match="fusion is 'auto', 'on' or 'off'"):
        set_fusion("fast")  # type: ignore[arg-type]


def test_fused_kernels_equal_eager_and_reuse_their_code_for_other_lengths_and_row_counts() -> None:
    set_fusion("on")
    torch._dynamo.reset()
    rows_kernel = KERNELS["attention_rows"]

    def rows_case(length: int, count: int) -> tuple[torch.Tensor, ...]:
        query, key, visible = random_case(length + count, 8, 2, length)
        rows = torch.stack([torch.randperm(length)[:count] for _ in range(2)])
        return query, key, 0.25, rows, torch.gather(visible[:, 0], 1, rows[:, :, None].expand(-1, -1, length))

    # R = 1 is its own graph (a size-1 dim), and so is a block of rows as long as the prompt (equal sizes share a
    # symbol on the first trace): prompts longer than ROWS_PER_BLOCK give blocks of other lengths
    warmup = [rows_case(40, 1), rows_case(40, 3), rows_case(300, 5)]
    def check(case: tuple[torch.Tensor, ...]) -> None:
        torch.testing.assert_close(rows_kernel(*case), rows_kernel.compute(*case), rtol=0, atol=1e-6)
        visible = random_case(0, 8, 2, case[0].shape[2])[2]
        torch.testing.assert_close(column_sums(*case[:3], visible),
                                   columns_module.AttentionColumns().compute(*case[:3], visible), rtol=0, atol=1e-5)

    for case in warmup:
        check(case)
    graphs = counters["stats"]["unique_graphs"]
    for length, count in [(57, 2), (123, 7), (520, 16), (77, 1)]:
        check(rows_case(length, count))
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for new lengths or row counts


class _Unfusable(Kernel):
    name = "unfusable"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        torch._dynamo.graph_break()  # what fullgraph compilation refuses (as it would an op it cannot trace)
        return x * x.sum()


def test_a_kernel_that_cannot_be_compiled_warns_once_and_runs_eagerly() -> None:
    set_fusion("on")
    kernel, x = _Unfusable(), torch.arange(4.0)
    with pytest.warns(UserWarning, match="policyc kernel 'unfusable' could not be compiled"):
        assert torch.equal(kernel(x), x * 6.0)
    assert torch.equal(kernel(x + 1), (x + 1) * 10.0)  # eager from then on


@pytest.mark.parametrize("policy", ["fastv", "h2o"])
def test_a_compiled_policy_selects_the_same_tokens_fused_or_not(policy: str) -> None:
    """FastV scores the last row's attention (attention_rows); H2O sums every row's (column_sums)."""
    results = []
    for mode in ("off", "on"):
        set_fusion(mode)  # type: ignore[arg-type]
        model = tiny_llava_clip(seed=3)
        inputs = make_inputs(model, batch=2, pad_left=2, seed=3)
        policyc.compile(model, policy)
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        results.append((out.sequences, out.logits[0], model.policyc.kept_positions))
        model.policyc.remove()
    kernel = KERNELS["attention_rows" if policy == "fastv" else "attention_columns"]
    assert kernel._compiled is not None and not kernel._broken  # the fused code ran
    (tokens, logits, kept), (fused_tokens, fused_logits, fused_kept) = results
    assert torch.equal(kept, fused_kept) and torch.equal(tokens, fused_tokens)
    torch.testing.assert_close(fused_logits, logits, rtol=0, atol=1e-5)
