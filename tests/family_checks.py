"""The checks every model family passes (issue "Beyond LLaVA-1.5"), shared by the per-family test files:
the identity policy bit-exact at every generate() step, and standard-library policies whose padded batches
generate what their rows generate alone.

A family's test file supplies a tiny model and `inputs` (a left-padded batch, as its processor gives them)
and `split(inputs, row)`: that row alone, without its padding, with its own images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

import policyc

Inputs = dict[str, torch.Tensor]


def greedy(model: torch.nn.Module, inputs: Inputs, steps: int) -> Any:
    """Greedy generate() with the scores of every step."""
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_scores=True,
                          return_dict_in_generate=True)


def assert_identity_is_bit_exact(model: torch.nn.Module, inputs: Inputs, steps: int = 5, **params: Any) -> None:
    """FastV keeping every image token (its machinery runs: scores, gathers; `params`, e.g. `layer=3`, move it)
    gives the unmodified model's sequences and bit-identical logits at every step; `remove()` leaves the model as
    it was."""
    plain = greedy(model, inputs, steps)
    policyc.compile(model, "fastv", ratio="100%", **params)
    try:
        compiled = greedy(model, inputs, steps)
    finally:
        model.policyc.remove()
        del model.policyc
    assert torch.equal(plain.sequences, compiled.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, compiled.scores, strict=True))
    assert torch.equal(greedy(model, inputs, steps).sequences, plain.sequences)


def assert_batch_equals_single_runs(model: torch.nn.Module, policy: str, params: Mapping[str, Any], inputs: Inputs,
                                    split: Callable[[Inputs, int], Inputs], steps: int = 6,
                                    drops: bool = False) -> torch.Tensor | None:
    """Compile `policy` with `params`, generate the batch and each row alone: the same tokens, and scores
    within 1e-5. With `drops`, prefill must have dropped tokens. Returns the kept prompt positions."""
    policyc.compile(model, policy, **params)
    try:
        batched = greedy(model, inputs, steps)
        kept = model.policyc.kept_positions
        for row in range(inputs["input_ids"].shape[0]):
            alone = greedy(model, split(inputs, row), steps)
            assert torch.equal(batched.sequences[row, -steps:], alone.sequences[0, -steps:])
            for a, b in zip(batched.scores, alone.scores, strict=True):
                torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-5)
    finally:
        model.policyc.remove()
        del model.policyc
    if drops:
        assert kept is not None and kept.shape[1] < inputs["input_ids"].shape[1]
    return kept


def assert_saved_directory_compiles(model: torch.nn.Module, directory: Path) -> None:
    """`policyc compile DIR fastv -o OUT` on `model` saved to `directory`: exit 0, the compile report printed and
    written (its calibration inputs are the family's `sample_inputs`)."""
    from click.testing import CliRunner

    from policyc.cli import main

    model.save_pretrained(directory / "model")
    out = directory / "out"
    result = CliRunner().invoke(main, ["compile", str(directory / "model"), "fastv", "-o", str(out),
                                       "--param", "layer=1"])
    assert result.exit_code == 0, result.output
    assert "tokens kept per stage" in result.output and (out / "report.json").is_file()


# The LLM-side standard library every family runs, with parameters that act on tiny inputs (16-24 image tokens)
# and 32-layer LLMs (PyramidDrop's layers 7, 15, 23 exist); True: prefill drops tokens.
LLM_POLICIES: list[tuple[str, dict[str, Any], bool]] = [
    ("fastv", {}, True),
    ("pyramiddrop", {}, True),
    ("sparsevlm", {"early": 20, "middle": 12, "late": 6}, True),
    ("h2o", {}, False),
    ("snapkv", {"window": 4, "capacity": 24}, False),
    ("pyramiddrop_snapkv", {}, True),
    ("visiondrop_llm", {"early": 12, "middle": 8, "late": 4}, True),  # VisionZip-style without a CLS token
]

__all__ = ["LLM_POLICIES", "assert_batch_equals_single_runs", "assert_identity_is_bit_exact",
           "assert_saved_directory_compiles", "greedy"]


def tome_forward(model: torch.nn.Module, inputs: Inputs, r: int) -> tuple[torch.Tensor, Any]:
    """One forward with the standard library's ToMe (`r` merges per encoder layer) compiled: the logits and the
    runtime's record of the images (`merged_into`, `encoder_rows`); the model is left as it was."""
    policyc.compile(model, "tome", r=r)
    try:
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        return logits, model.policyc.images
    finally:
        model.policyc.remove()


def assert_tome_shrinks_only_the_encoder(model: torch.nn.Module, r: int, name: str) -> Any:
    """ToMe's compile report: fewer encoder FLOPs, the same LLM FLOPs (the connector keeps the token layout).
    Returns the report."""
    from policyc.models import adapt
    from policyc.report import measure

    inputs = adapt(model).sample_inputs()  # before compiling: wrapped layers hide some towers' attention
    policyc.compile(model, "tome", r=r)
    try:
        report = measure(model.policyc, inputs, name)
    finally:
        model.policyc.remove()
    assert report.flops_after.encoder < report.flops_before.encoder
    assert report.flops_after.llm == report.flops_before.llm
    return report
