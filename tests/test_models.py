"""Model adapters: hook points found by structure on tiny LLaVA models (CLIP and SigLIP towers)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_models import IMAGE_TOKEN_ID, PAD_ID, image_tokens, make_inputs, tiny_llava_clip, tiny_llava_siglip
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlavaForConditionalGeneration

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import ModelAdapter, adapt, load_model

BUILDERS: dict[str, Callable[..., LlavaForConditionalGeneration]] = {
    "clip": tiny_llava_clip, "siglip": tiny_llava_siglip,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request: pytest.FixtureRequest) -> tuple[str, LlavaForConditionalGeneration, ModelAdapter]:
    model = BUILDERS[request.param]()
    return request.param, model, adapt(model)


@contextmanager
def captured(modules: list[nn.Module], inputs: bool = False) -> Iterator[list[Any]]:
    """Record each call's output (or first positional input) of `modules`, in call order."""
    seen: list[Any] = []

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        value = args[0] if inputs else output
        seen.append((module, value[0] if isinstance(value, tuple) else value))

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def test_adapter_fields(tiny: tuple[str, LlavaForConditionalGeneration, ModelAdapter]) -> None:
    name, model, adapter = tiny
    assert adapter.family == "llava" and adapter.model is model
    assert len(adapter.vision_layers) == 3 and len(adapter.vision_attention) == 3
    assert len(adapter.decoder_layers) == 4 and len(adapter.decoder_attention) == 4
    assert adapter.has_cls is (name == "clip")
    # vision_feature_layer -2 of 3 layers: hidden_states has 4 entries, [-2] is [2], the output of layer 1
    assert adapter.feature_layer == 2 and adapter.feature_encoder_layer == 1
    assert adapter.feature_start == (1 if name == "clip" else 0)
    assert adapter.keeps_cls_in_features is False
    assert adapter.patch_grid == (4, 4) and adapter.num_patches == 16
    assert adapter.vision_tokens == (17 if name == "clip" else 16)
    assert adapter.tokens_per_image == 16 == image_tokens(model)
    assert (adapter.num_heads, adapter.num_kv_heads, adapter.head_dim, adapter.hidden_size) == (4, 2, 16, 64)
    assert (adapter.vision_num_heads, adapter.vision_head_dim) == (4, 8)
    assert adapter.image_token_id == IMAGE_TOKEN_ID
    assert adapter.decoder is model.get_decoder()
    assert type(adapter.projector).__name__ == "LlavaMultiModalProjector"
    assert adapter.rotary is not None and "Rotary" in type(adapter.rotary).__name__
    for layer, attention in zip(adapter.vision_layers, adapter.vision_attention, strict=True):
        assert any(child is attention for child in layer.children())
    for layer, attention in zip(adapter.decoder_layers, adapter.decoder_attention, strict=True):
        assert any(child is attention for child in layer.children())
        assert attention.head_dim == adapter.head_dim
        assert attention.num_key_value_groups == adapter.num_heads // adapter.num_kv_heads
    assert ("cls_attention" in adapter.signals()) is (name == "clip")
    assert {"encoder_attention", "llm_attention"} <= adapter.signals()
    with pytest.raises(dataclasses.FrozenInstanceError):
        adapter.has_cls = True  # type: ignore[misc]


def test_describe(tiny: tuple[str, LlavaForConditionalGeneration, ModelAdapter]) -> None:
    name, _, adapter = tiny
    text = adapter.describe()
    assert "LlavaForConditionalGeneration (family llava)" in text
    assert ("4x4 patches + CLS" if name == "clip" else "4x4 patches (no CLS)") in text
    assert "encoder layer 1 (hidden_states[2])" in text and "16 image tokens per image" in text
    assert "4 heads (2 kv) x 16, hidden 64" in text and "visual token ids: 100" in text
    assert len(text.splitlines()) <= 8


def test_vision_layer_i_outputs_hidden_state_i_plus_1(
        tiny: tuple[str, LlavaForConditionalGeneration, ModelAdapter]) -> None:
    _, model, adapter = tiny
    pixels = make_inputs(model)["pixel_values"]
    with torch.no_grad(), captured(list(adapter.vision_layers)) as seen:
        hidden = adapter.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert len(hidden) == len(adapter.vision_layers) + 1
    assert [m for m, _ in seen] == list(adapter.vision_layers)
    for i, (_, output) in enumerate(seen):
        assert torch.equal(output, hidden[i + 1]), f"layer {i}"
    assert hidden[0].shape[1] == adapter.vision_tokens


@pytest.mark.parametrize(("name", "strategy", "expected"),
                         [("clip", "default", 16), ("clip", "full", 17), ("siglip", "full", 16),
                          ("siglip", "default", 15)])
def test_projector_sees_the_feature_layer(name: str, strategy: str, expected: int) -> None:
    model = BUILDERS[name](strategy=strategy)
    adapter = adapt(model)
    assert adapter.tokens_per_image == expected == image_tokens(model)
    assert adapter.keeps_cls_in_features is (name == "clip" and strategy == "full")
    inputs = make_inputs(model)
    with torch.no_grad():
        hidden = adapter.vision_tower(inputs["pixel_values"], output_hidden_states=True).hidden_states
        with captured([adapter.projector], inputs=True) as seen:
            model(**inputs)
    assert len(seen) == 1
    assert torch.equal(seen[0][1], hidden[adapter.feature_layer][:, adapter.feature_start:])


def test_decoder_layers_run_in_order(tiny: tuple[str, LlavaForConditionalGeneration, ModelAdapter]) -> None:
    _, model, adapter = tiny
    hooked = [*adapter.decoder_layers, *adapter.decoder_attention, adapter.rotary]
    with torch.no_grad(), captured(hooked) as seen:  # type: ignore[arg-type]
        model(**make_inputs(model))
    order = [m for m, _ in seen]
    assert order[0] is adapter.rotary
    layers = [m for m in order if any(m is layer for layer in adapter.decoder_layers)]
    assert layers == list(adapter.decoder_layers)
    attentions = [m for m in order if any(m is a for a in adapter.decoder_attention)]
    assert attentions == list(adapter.decoder_attention)


POLICY = """policy clsdrop {
  stage encoder.layer[LAYER] {
    keep top 8 of vision by attention(cls -> vision)
  }
  stage llm.layer[2] {
    keep top 50% of vision by attention(last -> vision)
  }
}
"""


def _requirements(text: str) -> tuple[Any, ...]:
    (checked,) = check_source(text, "clsdrop.tokpol")
    return checked.requirements


def test_cls_policy_fails_on_siglip_naming_the_line(
        tiny: tuple[str, LlavaForConditionalGeneration, ModelAdapter]) -> None:
    name, _, adapter = tiny
    text = POLICY.replace("LAYER", "-2")
    if name == "clip":
        adapter.check(_requirements(text))
        return
    with pytest.raises(PolicyError) as caught:
        adapter.check(_requirements(text))
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.span is not None and diagnostic.span.line == 3
    rendered = str(caught.value.with_source(text))
    assert rendered.startswith("clsdrop.tokpol:3:39: error: the policy reads the encoder's CLS token, "
                               "but this model's vision tower (SiglipVisionModel) has no CLS token")
    assert "attention(cls -> vision)" in rendered and "hint:" in rendered


def test_layers_out_of_range_are_reported_together(
        tiny: tuple[str, LlavaForConditionalGeneration, ModelAdapter]) -> None:
    name, _, adapter = tiny
    text = POLICY.replace("LAYER", "3").replace("llm.layer[2]", "llm.layer[-5]")
    with pytest.raises(PolicyError) as caught:
        adapter.check(_requirements(text))
    messages = [d.message for d in caught.value.diagnostics]
    assert len(messages) == (2 if name == "clip" else 3)
    assert messages[0].startswith("encoder layer 3 does not exist (encoder.layer[3] runs there)")
    assert "the vision encoder has 3 layers" in messages[0]
    assert any(m.startswith("LLM layer -5 does not exist") and "has 4 layers" in m for m in messages)
    adapter.check(_requirements(POLICY.replace("LAYER", "-3").replace("attention(cls -> vision)", "key_norm")))


def test_multi_layer_features_are_rejected() -> None:
    model = tiny_llava_clip(feature_layer=[-2, -1])  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="multi-layer feature selection is not supported yet"):
        adapt(model)


def test_unsupported_model_lists_families() -> None:
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                         num_hidden_layers=1, vocab_size=32))
    with pytest.raises(PolicyError) as caught:
        adapt(llama)
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.message == "unsupported model LlamaForCausalLM"
    assert diagnostic.hint is not None and "llava (LlavaForConditionalGeneration" in diagnostic.hint
    with pytest.raises(PolicyError, match="unsupported model Linear"):
        adapt(nn.Linear(2, 2))


def test_load_model_from_directory_is_bit_exact(tmp_path: Path) -> None:
    model = tiny_llava_siglip(seed=3)
    model.save_pretrained(tmp_path)
    loaded, adapter = load_model(str(tmp_path))
    assert not loaded.training and adapter.model is loaded and adapter.family == "llava"
    assert adapter.has_cls is False and adapter.tokens_per_image == 16
    inputs = make_inputs(model, batch=2, pad_left=1)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_model_errors(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(PolicyError) as caught:
        load_model(str(missing))
    assert str(missing) in str(caught.value) and "cannot be downloaded here" in str(caught.value)
    with pytest.raises(PolicyError, match=r"'policyc-test/not-a-model'.*cannot be downloaded here"):
        load_model("policyc-test/not-a-model", local_files_only=True)
    with pytest.raises(PolicyError, match=r"has no config\.json"):
        load_model(str(tmp_path))
    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_hidden_layers=1, vocab_size=32)).save_pretrained(tmp_path / "llama")
    with pytest.raises(PolicyError) as caught:
        load_model(str(tmp_path / "llama"))
    assert "unsupported model type 'llama'" in str(caught.value) and "llava" in str(caught.value)


def test_make_inputs_layout() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model, batch=3, text_before=3, text_after=4, pad_left=[0, 2, 1])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (3, 3 + 16 + 4)
    assert inputs["pixel_values"].shape == (3, 3, 32, 32)
    assert ((ids == IMAGE_TOKEN_ID).sum(dim=1) == 16).all()
    assert mask.sum(dim=1).tolist() == [23, 21, 22]
    assert ((ids == PAD_ID) == (mask == 0)).all()
    assert torch.equal(make_inputs(model, batch=2, pad_left=2)["attention_mask"][:, :2],
                       torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_tiny_models_generate_with_left_padding(name: str) -> None:
    model = BUILDERS[name]()
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
        # the padded row gives the same next-token logits as the same row without its padding
        batched = model(**inputs).logits[1, -1]
        alone = {"input_ids": inputs["input_ids"][1:, 2:], "attention_mask": inputs["attention_mask"][1:, 2:],
                 "pixel_values": inputs["pixel_values"][1:]}
        single = model(**alone).logits[0, -1]
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_every_family_knows_a_layout_to_draw_kept_tokens_on() -> None:
    """--show-tokens needs every image's LLM tokens on grids over pictures: LLaVA (one token per patch), Qwen2-VL
    (its merged rasters), Gemma 3 (its pooled grids), LLaVA-NeXT (base views and unpadded crops), Idefics3 and
    InternVL (tiles and global views) each know them (tests/test_show_tokens.py draws them)."""
    from tiny_gemma3 import tiny_gemma3
    from tiny_idefics3 import tiny_idefics3
    from tiny_internvl import tiny_internvl
    from tiny_llava_next import tiny_anyres
    from tiny_models import tiny_qwen2_vl

    for model in (tiny_llava_clip(), tiny_qwen2_vl(), tiny_gemma3(), tiny_idefics3(), tiny_internvl(),
                  tiny_anyres("llava_next")):
        assert adapt(model).draws_tokens
