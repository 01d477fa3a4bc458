"""The example plug-in, installed (`pip install -e examples/policyc-plugin-example`): policyc finds `value_energy`
through its entry point, lists it with its package, checks, searches and runs a policy using it, and the signal
equals a hand computation from the model's attention values."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

import policyc
from policyc.catalog import SIGNALS
from policyc.cli import main
from policyc.lang.search_space import space_from_policies
from policyc.models.bundled import DEFAULT_NAME, example_image_path, load_reference_model, load_reference_processor
from policyc.run import prompt_inputs

POLICY = Path(__file__).parent.parent / "policies" / "value_energy.tokpol"


def test_the_entry_point_registers_value_energy_under_its_package() -> None:
    assert "value_energy" in SIGNALS
    assert SIGNALS.package("value_energy") == "policyc-plugin-example"
    listing = CliRunner().invoke(main, ["list", "signals", "--json", "-"])
    entry = next(s for s in json.loads(listing.stdout)["signals"] if s["name"] == "value_energy")
    assert entry["package"] == "policyc-plugin-example" and entry["signature"] == "value_energy(power=2)"


def test_the_policy_checks_and_its_plugin_option_is_searched() -> None:
    checked = policyc.parse(POLICY)
    dimensions = {d.param for d in space_from_policies([checked]).dimensions}
    assert dimensions == {"ratio", "power"}


@torch.no_grad()
def test_value_energy_keeps_the_patches_with_the_most_value_energy() -> None:
    """On the embedded default model (LLaVA, CLIP of 24 layers, 4 heads): encoder.layer[-2] is CLIP layer 22,
    whose values are v_proj(layer_norm1(its input)); the default strategy drops CLS, 144 patches remain."""
    model = load_reference_model(DEFAULT_NAME)
    inputs = prompt_inputs(load_reference_processor(DEFAULT_NAME), example_image_path(), "What colour is the shape?",
                           "cpu", torch.float32)
    tower = model.model.vision_tower
    hidden = tower(inputs["pixel_values"], output_hidden_states=True).hidden_states[22]  # layer 22's input
    layer = tower.vision_model.encoder.layers[22] if hasattr(tower, "vision_model") else tower.encoder.layers[22]
    values = layer.self_attn.v_proj(layer.layer_norm1(hidden))[0, 1:]  # [144, C], patches only
    energy = values.view(144, 4, -1).mean(1).pow(2).sum(-1)  # head-mean value vector, squared L2
    expected = torch.sort(-energy, stable=True).indices[:72].sort().values  # ties go to the earlier patch

    policyc.compile(model, policyc.parse(POLICY))
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero()[:, 0]  # the 144 image positions
    kept = [p for p in model.policyc.kept_positions[0].tolist() if p in set(image.tolist())]
    assert kept == image[expected].tolist()


def test_policyc_run_on_the_embedded_default_model() -> None:
    result = CliRunner().invoke(main, ["run", str(POLICY), "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
    assert " 72   " in next(x for x in result.stdout.splitlines() if "encoder.layer[-2]" in x)  # 50% of 144
