"""Shared checks on generate() results for the test files."""

from __future__ import annotations

from collections.abc import Callable

import torch


def assert_rows_equal_single_runs(generate: Callable[[dict], object], inputs: dict, batched: object,
                                  steps: int) -> None:
    """Each row of a left-padded batch generates what it generates alone: the same last `steps` tokens
    and scores within 1e-5. `generate(inputs)` returns a generate() output with scores."""
    for row in range(inputs["input_ids"].shape[0]):
        valid = inputs["attention_mask"][row].bool()
        alone = generate({key: value[row : row + 1, valid] if key != "pixel_values" else value[row : row + 1]
                          for key, value in inputs.items()})
        assert torch.equal(batched.sequences[row, -steps:], alone.sequences[0, -steps:])  # type: ignore[attr-defined]
        for a, b in zip(batched.scores, alone.scores, strict=True):  # type: ignore[attr-defined]
            torch.testing.assert_close(a[row], b[0], rtol=0, atol=1e-5)
