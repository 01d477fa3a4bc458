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


def assert_same_steps(result, tokens: torch.Tensor, logits: torch.Tensor, prompt: int) -> None:  # type: ignore[no-untyped-def]
    """A generate() output with scores decodes a reference's greedy `tokens` [B, T] after the `prompt` tokens, its
    scores within 1e-5 of the reference's `logits` [B, T, V]."""
    assert torch.equal(result.sequences[:, prompt:], tokens)
    for step, expected in enumerate(logits.unbind(1)):
        torch.testing.assert_close(result.scores[step], expected, rtol=0, atol=1e-5)


def assert_one_compiled_decode_graph(model: torch.nn.Module, inputs: dict, expected: torch.Tensor, graphs: int = 1,
                                     **options: object) -> None:
    """transformers' auto-compile of static-cache decode steps (on CUDA: mode reduce-overhead, CUDA graphs), turned
    on for CPU with dynamo's eager backend (the graphs inductor would compile, without code generation): two
    requests generate `expected` (token ids), in one graph with no break, and no step or second request compiles
    again. `graphs`: every graph compiled (a graph backend adds its prefill graph). `options`: generate()'s
    (max_new_tokens, ...); static cache and greedy decoding are added here."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    config = CompileConfig(backend="eager", mode=None, dynamic=False)
    config._compile_all_devices = True
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            out = model.generate(**inputs, **options, do_sample=False, cache_implementation="static",
                                 compile_config=config)
            assert torch.equal(getattr(out, "sequences", out), expected)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["graph_break"]
