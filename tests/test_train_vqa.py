"""The training script's pieces: per-patch labels for pretraining the vision tower, and progressive stacking
of a shallow trained model into the shipped depth."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from policyc.vqa.model import training_batch, vqa_config, vqa_processor
from policyc.vqa.scenes import COLORS, SHAPES, samples, scene_questions


def _train_script() -> ModuleType:
    path = Path(__file__).parents[1] / "scripts" / "train_vqa.py"
    spec = importlib.util.spec_from_file_location("train_vqa", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("index", range(12))
def test_patch_labels_name_the_shape_under_each_patch(index: int) -> None:
    scene = next(iter(samples("validation", 1, start=index))).scene
    labels = scene.patch_labels()
    assert {len(v) for v in labels.values()} == {144}
    assert sum(labels["centre"]) == len(scene.shapes)  # one shape per layout cell: centres are 32 px apart
    for shape in scene.shapes:
        centre = shape.y // 8 * 12 + shape.x // 8
        assert labels["centre"][centre] == 1
        assert labels["color"][centre] == 1 + list(COLORS).index(shape.color)
        assert labels["kind"][centre] == 1 + SHAPES.index(shape.kind)
        assert labels["cell"][centre] == shape.cell
    covered = {i for i, color in enumerate(labels["color"]) if color}
    assert covered == {i for i, kind in enumerate(labels["kind"]) if kind}
    far = [i for i in range(144) if all(abs(i // 12 * 8 + 4 - s.y) > 16 or abs(i % 12 * 8 + 4 - s.x) > 16
                                        for s in scene.shapes)]
    assert far and not covered & set(far)


def _model(vision_layers: int, text_layers: int) -> torch.nn.Module:
    torch.manual_seed(vision_layers * 100 + text_layers)
    return LlavaForConditionalGeneration._from_config(vqa_config(vision_layers, text_layers)).eval()


def test_stacking_into_the_same_depth_is_a_copy() -> None:
    script = _train_script()
    source, target = _model(2, 2), _model(2, 2)
    script.stack_layers(source, target)
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_stacking_repeats_each_layer_and_computes_the_same_function() -> None:
    script = _train_script()
    source, target = _model(2, 4), _model(4, 8)
    script.stack_layers(source, target)
    shallow, deep = source.model.language_model.layers, target.model.language_model.layers
    for j, layer in enumerate(deep):
        origin = shallow[j // 2]
        assert torch.equal(layer.self_attn.q_proj.weight, origin.self_attn.q_proj.weight)
        live = origin.mlp.down_proj.weight if j % 2 == 1 else torch.zeros_like(origin.mlp.down_proj.weight)
        assert torch.equal(layer.mlp.down_proj.weight, live)
    shallow, deep = (next(m for name, m in model.named_modules() if name.endswith("encoder.layers"))
                     for model in (source, target))  # the CLIP layers' path differs across transformers 5.x
    for j, layer in enumerate(deep):
        assert torch.equal(layer.layer_norm1.weight, shallow[j // 2].layer_norm1.weight)
        assert torch.equal(layer.self_attn.out_proj.bias, shallow[j // 2].self_attn.out_proj.bias * (j % 2 == 1))
    assert torch.equal(source.lm_head.weight, target.lm_head.weight)
    processor = vqa_processor()
    batch = training_batch(processor, [scene_questions("train", i) for i in range(2)])
    del batch["labels"]
    with torch.no_grad():
        torch.testing.assert_close(target(**batch).logits, source(**batch).logits, rtol=1e-5, atol=1e-5)
