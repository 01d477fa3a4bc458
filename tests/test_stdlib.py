"""The standard library as a whole: the methods table (docs/methods/index.md) lists every policy in policies/ with a
status, and a policy marked proven or runs goes end to end through `policyc run` on the embedded default;
DivPrune and ToDRE's diversity stage equal the plain DivPrune reference (tests/reference/divprune.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reference.divprune import divprune_keep
from tiny_models import make_inputs, tiny_llava_clip, tiny_llava_siglip

from policyc.cli import main
from policyc.lang import ir
from policyc.runtime import compile_model

ROOT = Path(__file__).parent.parent
POLICIES = sorted(p.stem for p in (ROOT / "policies").glob("*.tokpol"))


def methods_table() -> dict[str, str]:
    """policy name -> status word (`proven`, `runs` or `not yet`), from the methods table of the docs."""
    text = (ROOT / "docs" / "methods" / "index.md").read_text(encoding="utf-8")
    table = text.split("<!-- methods:start -->")[1].split("<!-- methods:end -->")[0]
    statuses: dict[str, str] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 5 or not cells[3].startswith("[`"):
            continue
        name = re.match(r"\[`(\w+)\.tokpol`\]", cells[3]).group(1)  # type: ignore[union-attr]
        statuses[name] = cells[4].split(":")[0].strip("* ")
    return statuses


def test_every_policy_is_in_the_methods_table_and_every_row_has_a_policy() -> None:
    table = methods_table()
    assert sorted(table) == POLICIES
    assert set(table.values()) <= {"proven", "runs", "not yet"}


# The code's absolute LLM layers that the embedded default's 8-layer LLM lacks: these fail at the policy line
TOO_DEEP = {"mustdrop": ("llm.layer[2, 6, 10, 14]", 10), "sparsevlm": ("llm.layer[2, 6, 15]", 15)}


@pytest.mark.parametrize("name", POLICIES)
def test_each_policy_runs_end_to_end_on_the_embedded_default_or_says_why_not(name: str) -> None:
    status = methods_table()[name]
    result = CliRunner().invoke(main, ["run", name, "--max-new-tokens", "2"])
    if status == "not yet":
        assert result.exit_code != 0 and "not implemented" in result.output, result.output
    elif name in TOO_DEEP:
        hook, layer = TOO_DEEP[name]
        assert result.exit_code == 1, result.output
        assert f"error: LLM layer {layer} does not exist ({hook} runs there): the language model has 8 layers" \
            in result.output and "hint: valid layers: 0..7 or -8..-1" in result.output
        assert CliRunner().invoke(main, ["run", "random", name, "--max-new-tokens", "2"]).exit_code == 0  # 32 layers
    else:
        assert result.exit_code == 0, result.output
        assert "new tokens" in result.output


@pytest.mark.parametrize("build", [tiny_llava_clip, tiny_llava_siglip])
@pytest.mark.parametrize(("name", "objective"), [("divprune", "min"), ("todre", "sum"), ("todre", "min"),
                                                  ("todre_diversity", "sum"), ("todre_diversity", "min")])
@pytest.mark.parametrize(("seed", "ratio"), [(0, 30), (1, 50), (2, 10)])
def test_diversity_policies_equal_the_plain_divprune_reference(build, name: str, objective: str, seed: int,  # type: ignore[no-untyped-def]
                                                               ratio: int) -> None:
    model = build(seed=seed)
    pixel_values = make_inputs(model, batch=2, seed=seed)["pixel_values"]
    with torch.no_grad():
        plain = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
    params: dict[str, ir.Expr] = {"ratio": ir.Percent(value=ratio)}
    if name.startswith("todre"):
        params["objective"] = ir.Name(id=objective)
    compiled = compile_model(model, name, params)
    try:
        count = plain.shape[1] * ratio // 100
        expected = divprune_keep(plain, count, objective)
        inputs = make_inputs(model, batch=2, seed=seed)
        with torch.no_grad():
            model(**inputs)
        kept, _ = compiled.runtime.image_slots
        assert torch.equal(kept, expected)
        assert int(kept.sum()) == 2 * count
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    finally:
        compiled.remove()
