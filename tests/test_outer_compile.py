"""A compiled policy wrapped whole in `torch.compile`, as users wrap models (`model.forward = torch.compile(
model.forward, mode="reduce-overhead")` for CUDA graphs at batch 1): dynamo traces the eager backend's runtime code,
breaking its graph at the policy's host-side counts, and generate() gives the uncompiled policy's tokens; a graph
backend's prefill still runs its own rewritten graph inside; and `policyc bench --compile` times every row so.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from tiny_models import make_inputs, tiny_llava_clip
from torch._dynamo.utils import counters

import policyc
import policyc.bench
from policyc.bench import Settings
from policyc.bench_command import bench_command
from policyc.cli import main
from policyc.runtime.patching import replace_attribute

STEPS = 3
# (policy, parameters, LLM layers of the tiny model): one of each runtime path (an LLM stage; ragged counts with
# fillers, `positions cache_length` and `cache regather`; a vision-encoder stage; a merge; a decode cache policy)
POLICIES = [
    ("fastv", {}, 4),
    ("mustdrop", {}, 16),
    ("visionzip", {"dominant": 6, "contextual": 2}, 4),
    ("tome", {}, 4),
    ("h2o", {"heavy": "25%", "recent": "25%"}, 4),
]


def generate(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    return model.generate(**inputs, max_new_tokens=STEPS, do_sample=False)


@contextmanager
def wrapped_in_compile(model: torch.nn.Module, **options: Any) -> Iterator[None]:
    """`model.forward` through torch.compile, with fresh dynamo caches and counters; taken off again on leaving."""
    torch._dynamo.reset()
    counters.clear()
    undo = replace_attribute(model, "forward", torch.compile(model.forward, **options))
    try:
        yield
    finally:
        undo()
        torch._dynamo.reset()


@pytest.mark.parametrize(("policy", "params", "layers"), POLICIES, ids=[p[0] for p in POLICIES])
def test_policy_under_a_whole_model_compile_generates_the_same_tokens(policy: str, params: dict[str, Any],
                                                                      layers: int) -> None:
    model = tiny_llava_clip(seed=1, num_llm_layers=layers)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=1, text_after=6)
    compiled = policyc.compile(model, policy, **params).policyc
    expected = generate(model, inputs)
    kept = {k: v.clone() for k, v in compiled.runtime.kept_at_layer.items()}
    with wrapped_in_compile(model, backend="eager"):
        for _ in range(2):  # the second request runs the graphs the first compiled
            assert torch.equal(generate(model, inputs), expected)
        assert counters["stats"]["unique_graphs"] > 0  # dynamo traced it (not skipped as a whole)
    assert compiled.runtime.kept_at_layer.keys() == kept.keys()
    for layer, rows in kept.items():
        assert torch.equal(compiled.runtime.kept_at_layer[layer], rows)


def test_graph_backend_prefill_runs_its_own_graph_under_a_whole_model_compile() -> None:
    """The decoder's prefill leaves the outer trace (a graph break) and runs the fx backend's rewritten graph."""
    model = tiny_llava_clip(seed=2)
    inputs = make_inputs(model, batch=2, pad_left=2, seed=2)
    compiled = policyc.compile(model, "fastv", backend="fx").policyc
    expected = generate(model, inputs)
    with wrapped_in_compile(model, backend="eager"):
        assert torch.equal(generate(model, inputs), expected)
    prefill = [g for g in compiled.graphs if g.phase == "prefill"]
    assert prefill and all(g.passes for g in prefill)


def test_inductor_reduce_overhead_of_the_whole_model_generates_the_same_tokens() -> None:
    """The batch-1 CUDA-graph setting as code: inductor compiles every piece (on CPU without CUDA graphs)."""
    model = tiny_llava_clip(seed=3)
    inputs = make_inputs(model, batch=1, seed=3)
    policyc.compile(model, "fastv")
    expected = generate(model, inputs)
    with wrapped_in_compile(model, mode="reduce-overhead"):
        assert torch.equal(generate(model, inputs), expected)
        assert counters["inductor"]["cudagraph_skips"] > 0  # CPU graphs: inductor says it skipped CUDA graphs


def test_bench_compile_times_every_row_under_torch_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policyc.bench, "COMPILER", "eager")  # dynamo's graphs without inductor's codegen (fast)
    model = tiny_llava_clip(seed=4)
    settings = Settings(batch=1, prompt_len=8, gen_len=3, dtype="float32", warmup=1, repeats=1,
                        compile="reduce-overhead")
    result = bench_command(None, "fastv", settings=settings, preloaded=(model, "tiny"), console=Console(quiet=True))
    rows = {r["name"]: r for r in result["rows"]}
    assert result["settings"]["compile"] == "reduce-overhead"
    for name in ("unmodified", "ideal", "policy"):
        assert rows[name]["prefill_s"] > 0 and rows[name]["ttft_s"] > 0
        assert rows[name]["decode_tokens_per_s"] is None  # prefill and TTFT only
        assert rows[name]["recompiles"] == 0  # the warmup compiled every graph the timed runs took
        assert "torch.compile'd (mode reduce-overhead)" in rows[name]["note"]
    image = rows["unmodified"]["image_tokens"]
    assert rows["policy"]["image_tokens"] == rows["ideal"]["image_tokens"] < image  # FastV dropped some
    assert rows["ideal"]["tokens_per_layer"] == rows["policy"]["tokens_per_layer"]
    assert rows["reference"]["ttft_s"] is None and rows["reference"]["note"].startswith("not run: --compile")
    assert "forward" not in vars(model)  # the compiled forwards were taken off again


def test_bench_compile_refuses_a_graph_backend() -> None:
    result = CliRunner().invoke(main, ["bench", "random", "fastv", "--backend", "inductor", "--compile", "default"])
    assert result.exit_code != 0
    assert "--backend eager --compile default" in result.output
