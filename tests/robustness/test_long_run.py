"""Repeated generate() calls with a compiled model keep no state behind: the live tensor count and the
runtime's own bookkeeping are the same after 5 and after 25 calls (benchmarks/long_run.py measures memory
over 1000 calls)."""

from __future__ import annotations

import gc
import warnings

import torch
from tiny_models import make_inputs, tiny_llava_clip

from policyc.lang import check_stdlib
from policyc.runtime import compile_model


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some torch module objects warns about deprecations
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_repeated_generate_keeps_nothing_behind() -> None:
    model = tiny_llava_clip(num_llm_layers=16)
    compiled = compile_model(model, check_stdlib()["mustdrop"])  # encoder merge, LLM filter and decode cache
    batches = [make_inputs(model, batch=2, pad_left=2, seed=1), make_inputs(model, batch=1, text_after=9, seed=2)]
    counts = []
    try:
        for call in range(25):
            with torch.no_grad():
                model.generate(**batches[call % 2], max_new_tokens=4, do_sample=False)
            if call in (4, 24):
                runtime = compiled.runtime
                counts.append((live_tensors(), len(runtime.captured), len(runtime.kept_at_layer),
                               len(runtime.live_at_layer)))
    finally:
        compiled.remove()
    assert counts[0] == counts[1]
