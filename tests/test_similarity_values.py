"""The `similarity` signal and the `values` features (passes/similarity.py, passes/values.py) against a hand
computation on tiny LLaVA (16 image tokens at positions 3..18, CLIP tower of 3 layers, 4 heads of 8)."""

from __future__ import annotations

import torch
from tiny_models import make_inputs, tiny_llava_clip

import policyc

IMAGE = range(3, 19)  # the image tokens' positions in make_inputs' prompt


def kept_image_positions(policy: str) -> list[int]:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    policyc.compile(model, policyc.parse(policy))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    return [p for p in model.policyc.kept_positions[0].tolist() if p in IMAGE]


def top_positions(score: torch.Tensor, count: int) -> list[int]:
    """The `count` highest of a [16] score as prompt positions; ties go to the earlier token."""
    return sorted((torch.sort(-score, stable=True).indices[:count] + IMAGE.start).tolist())


def mean_cosine(features: torch.Tensor) -> torch.Tensor:
    """[16, C] -> [16]: each token's mean cosine similarity to all 16 (itself included)."""
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    return (unit @ unit.T).mean(1)


@torch.no_grad()
def test_similarity_to_vision_of_the_projected_features() -> None:
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    projected = model.model.get_image_features(pixel_values=inputs["pixel_values"], vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]  # [16, 64]
    policy = "policy s {\n  stage projector.output { keep top 8 of vision by similarity(vision) }\n}\n"
    assert kept_image_positions(policy) == top_positions(mean_cosine(projected), 8)


@torch.no_grad()
def test_similarity_by_the_values_of_an_encoder_layer() -> None:
    """encoder.layer[-2] is CLIP layer 1: its values are v_proj(layer_norm1(its input)), mean over 4 heads."""
    model = tiny_llava_clip()
    inputs = make_inputs(model)
    tower = model.model.vision_tower
    hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[1]  # layer 1's input, [1, 17, 32]
    layer = tower.encoder.layers[1] if hasattr(tower, "encoder") else tower.vision_model.encoder.layers[1]
    values = layer.self_attn.v_proj(layer.layer_norm1(hidden))[0, 1:].view(16, 4, 8).mean(1)  # patches, not CLS
    policy = ("policy s {\n  stage encoder.layer[-2] {\n"
              "    keep top 8 of vision by similarity(vision, features=values)\n  }\n}\n")
    assert kept_image_positions(policy) == top_positions(mean_cosine(values), 8)
