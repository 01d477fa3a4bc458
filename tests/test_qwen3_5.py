"""Qwen3.5 and Qwen3.5-MoE (hybrid Gated DeltaNet / full-attention LLM): the adapter, the identity policy bit-exact at
every generate() step, FastV and DivPrune against plain references that run the later layers (DeltaNet included) on
the kept rows, padded and ragged batches equal to single runs (fillers go before the real rows of linear layers),
attention signals refused at linear layers at compile time, and `layer=next` reading the next full layer. Cache
policies, static caches, the standard library and the released shape: tests/test_qwen3_5_decode.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from family_checks import assert_batch_equals_single_runs, assert_identity_is_bit_exact
from golden import check_golden
from reference.divprune import divprune_keep
from reference.fastv_hybrid import fastv_hybrid_generate, projector_hybrid_generate
from reference.fastv_mrope import mrope_positions
from tiny_models import QWEN_IMAGE_ID, make_qwen_inputs, qwen_single_row
from tiny_qwen3_5 import FULL_LAYERS, pad_batch, tiny_qwen3_5

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.models.qwen3_5 import Qwen35Adapter

GRIDS = ((8, 8), (4, 8))  # two images per row: 16 and 8 LLM tokens
MOE = (False, True)


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
def test_the_adapter_finds_the_parts(moe: bool) -> None:
    model = tiny_qwen3_5(moe=moe)
    adapter = adapt(model)
    lm = model.model.language_model
    assert isinstance(adapter, Qwen35Adapter) and adapter.family == "qwen3_5"
    assert adapter.decoder_layers is lm.layers and len(adapter.decoder_layers) == 8
    assert adapter.linear_layers == (0, 1, 2, 4, 5, 6)
    assert [type(a).__name__ for a in adapter.decoder_attention] == \
        ["Qwen3_5MoeGatedDeltaNet" if moe else "Qwen3_5GatedDeltaNet"] * 3 + \
        [f"Qwen3_5{'Moe' if moe else ''}Attention"] + [type(adapter.decoder_attention[0]).__name__] * 3 + \
        [type(adapter.decoder_attention[3]).__name__]
    assert adapter.vision_layers is model.model.visual.blocks and adapter.projector is model.model.visual.merger
    assert (adapter.rope, adapter.has_cls, adapter.deepstack_layers) == ("mrope", False, 0)
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim) == (4, 2, 32)
    assert "full attention at layers 3, 7" in adapter.describe()
    with torch.no_grad():
        inputs = adapter.sample_inputs()
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


def test_the_reference_positions_match_the_models_own() -> None:
    model = tiny_qwen3_5()
    inputs = make_qwen_inputs(grids=GRIDS)
    expected, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"],
                                             attention_mask=inputs["attention_mask"])
    assert torch.equal(mrope_positions(inputs["input_ids"][0], QWEN_IMAGE_ID, list(((8, 8), (4, 8))), 2),
                       expected[-3:, 0])


@pytest.mark.parametrize("moe", MOE, ids=["dense", "moe"])
@pytest.mark.parametrize("batch", [1, 2])
def test_identity_is_bit_exact_at_every_step(moe: bool, batch: int) -> None:
    """FastV at the first full-attention layer keeping every image token (scores, gathers and the linear layers'
    wrappers run) gives the unmodified model's sequences and bit-identical logits at every step."""
    assert_identity_is_bit_exact(tiny_qwen3_5(moe=moe), make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2),
                                 layer=FULL_LAYERS[0])


def _assert_kept_image_tokens(model: torch.nn.Module, inputs: dict[str, torch.Tensor],
                              expected: list[torch.Tensor]) -> None:
    image = inputs["input_ids"] == QWEN_IMAGE_ID
    for row, expected_row in enumerate(expected):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[image[row, kept]], expected_row)


@pytest.mark.parametrize(("moe", "seed", "layer", "keep", "batch"), [
    (False, 0, 3, 5, 1), (False, 2, 7, 6, 2), (True, 0, 3, 10, 1), (True, 3, 3, 8, 2)])
def test_fastv_equals_the_hybrid_reference(moe: bool, seed: int, layer: int, keep: int, batch: int) -> None:
    """FastV at a full-attention layer: the reference runs the later DeltaNet and attention layers on the kept rows."""
    model = tiny_qwen3_5(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = fastv_hybrid_generate(model, inputs, layer=layer, keep=keep, max_new_tokens=4)
    text = f"policy f {{ stage llm.layer[{layer}] {{ keep top {keep} of vision by attention(last -> vision) }} }}"
    policyc.compile(model, check_source(text)[0])
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize(("moe", "seed", "ratio", "batch"), [(False, 0, 25, 2), (True, 1, 50, 1), (True, 2, 25, 2)])
def test_divprune_equals_the_shorter_prompt_reference(moe: bool, seed: int, ratio: int, batch: int) -> None:
    """DivPrune at projector.output: every LLM layer (DeltaNet ones from the first) sees the kept tokens only, at
    their original M-RoPE positions."""
    model = tiny_qwen3_5(seed=seed, moe=moe)
    inputs = make_qwen_inputs(batch=batch, grids=GRIDS, pad_left=2, seed=seed)
    expected_tokens, expected_kept = projector_hybrid_generate(
        model, inputs, lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=4)
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    _assert_kept_image_tokens(model, inputs, expected_kept)
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1]:], expected_tokens)


@pytest.mark.parametrize(("policy", "params"), [
    ("random_drop", {"ratio": "50%"}), ("fastv", {"layer": 3, "ratio": "30%"})])
def test_padded_batches_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=3)
    assert_batch_equals_single_runs(tiny_qwen3_5(), policy, params, inputs, qwen_single_row, drops=True)


RAGGED = [make_qwen_inputs(grids=GRIDS, seed=4), make_qwen_inputs(grids=((4, 8),), text_before=5, seed=5)]


@pytest.mark.parametrize(("policy", "params", "moe"), [
    ("divprune", {"ratio": "50%"}, False),  # fillers from layer 0, a DeltaNet layer
    ("divprune", {"ratio": "50%"}, True),
    ("fastv", {"layer": 3, "ratio": "30%"}, False),  # fillers in DeltaNet layers 4..6
])
def test_ragged_batches_equal_single_runs(policy: str, params: dict, moe: bool) -> None:
    """Rows keeping different counts (24 and 8 image tokens): the shorter row's fillers run before its real rows in
    the DeltaNet layers, which leaves their states as the row alone leaves them."""
    inputs = pad_batch(RAGGED)
    kept = assert_batch_equals_single_runs(tiny_qwen3_5(seed=2, moe=moe), policy, params, inputs,
                                           lambda _inputs, row: RAGGED[row], drops=True)
    assert kept is not None


def test_fillers_between_real_rows_would_change_a_deltanet_layer() -> None:
    """Why fillers go first: a DeltaNet layer given a masked row in the middle of its sequence differs from the same
    sequence without that row (the zeroed row still decays its state), while a masked row first does not."""
    model = tiny_qwen3_5()
    layer = model.model.language_model.layers[0]
    rotary = model.model.language_model.rotary_emb
    hidden = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(0))
    without = torch.cat([hidden[:, :5], hidden[:, 6:]], dim=1)

    def run(rows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cos_sin = rotary(rows, torch.arange(rows.shape[1])[None, None].expand(3, 1, -1))
        with torch.no_grad():
            return layer(rows, position_embeddings=cos_sin, attention_mask=mask)

    alone = run(without, None)
    middle = run(hidden, (torch.arange(12) != 5).long()[None])
    first = run(torch.cat([hidden[:, 5:6], without], dim=1), (torch.arange(12) != 0).long()[None])
    assert (middle[:, 6:] - alone[:, 5:]).abs().max() > 1e-4
    torch.testing.assert_close(first[:, 1:], alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("policy", "params", "line", "nearest"), [
    ("fastv", {}, "fastv.tokpol:15:", "nearest full-attention layer: 3"),
    ("fastv", {"layer": 5}, "fastv.tokpol:15:", "nearest full-attention layers: 3 or 7"),
    ("pyramiddrop", {}, "pyramiddrop.tokpol:15:", "reads LLM layer 2"),
    ("visiondrop_llm", {}, "visiondrop_llm.tokpol:", "keys() at"),
])
def test_attention_signals_at_linear_layers_fail_at_compile_time(policy: str, params: dict, line: str,
                                                                 nearest: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen3_5(), policy, **params)
    text = str(error.value)
    assert "a linear-attention (Gated DeltaNet) layer" in text and line in text and nearest in text
    assert "this model attends at layers 3, 7" in text


def test_keys_at_a_named_linear_layer_fail_at_compile_time() -> None:
    text = "policy p { stage llm.layer[3] { keep top 4 of vision by key_norm(layer=-3) } }"
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen3_5(), check_source(text)[0])
    assert "key_norm() at llm.layer[3] reads LLM layer 5" in str(error.value) and ":1:" in str(error.value)


def test_layer_next_reads_the_next_full_layers_attention() -> None:
    """A stage after DeltaNet layer 2 scoring with `attention(last -> vision, layer=next)` recomputes layer 3's
    attention (its gated query projection, q/k norms and M-RoPE) on layer 2's output, which is layer 3's input: it
    keeps what FastV at layer 3 keeps from layer 3's own attention."""
    inputs = make_qwen_inputs(batch=2, grids=GRIDS, pad_left=2, seed=1)
    kept = []
    for layer, signal in ((2, "attention(last -> vision, layer=next)"), (3, "attention(last -> vision)")):
        model = tiny_qwen3_5(seed=1)
        policyc.compile(model, check_source(f"policy p {{ stage llm.layer[{layer}] {{ keep top 7 of vision by "
                                            f"{signal} }} }}")[0])
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
        kept.append(model.policyc.kept_positions)
    assert torch.equal(kept[0], kept[1])


GOLDEN = Path(__file__).parent / "golden" / "errors" / "hybrid"


@pytest.mark.parametrize("source", sorted(GOLDEN.glob("qwen3_5_*.tokpol")), ids=lambda p: p.stem)
def test_compile_errors_match_their_goldens(source: Path, update_goldens: bool) -> None:
    """Every signal reading a DeltaNet layer is one diagnostic at its own line (tests/golden/errors/hybrid/)."""
    checked = check_source(source.read_text(encoding="utf-8"), source.name)[0]
    with pytest.raises(PolicyError) as caught:
        policyc.compile(tiny_qwen3_5(), checked)
    assert all(d.span is not None and d.span.file == source.name for d in caught.value.diagnostics)
    check_golden(source.with_suffix(".err"), str(caught.value) + "\n", update_goldens)


@pytest.mark.parametrize(("policy", "layers", "expected"), [
    ("streamingllm", 8, "this model's LLM uses M-RoPE"),  # 1-D pos-shift
    ("pool", 8, "qwen3_5's projector stages do not have yet"),
    ("fastervlm", 8, "has no CLS token"),
    ("sparsevlm", 16, "attention() at llm.layer[2, 6, 15] reads LLM layer 2"),  # DeltaNet layers 2 and 6
])
def test_what_does_not_bind_fails_at_compile_time(policy: str, layers: int, expected: str) -> None:
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_qwen3_5(num_llm_layers=layers), policy)
    assert expected in str(error.value) and f"{policy}.tokpol:" in str(error.value)
