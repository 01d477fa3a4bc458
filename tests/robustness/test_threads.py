"""Two threads sharing one compiled model: generate() calls are serialized, so each thread gets exactly what it
gets alone; a bare forward() from another thread in the middle of a generate() is refused with a clear error."""

from __future__ import annotations

import threading

import torch
from tiny_models import make_inputs, tiny_llava_clip
from transformers import LogitsProcessor, LogitsProcessorList

from policyc.errors import PolicyError
from policyc.lang import check_stdlib
from policyc.runtime import compile_model


def test_two_threads_generating_get_their_single_thread_results() -> None:
    model = tiny_llava_clip()
    compiled = compile_model(model, check_stdlib()["fastv"])
    inputs = [make_inputs(model, batch=2, pad_left=2, seed=s) for s in (1, 2)]
    try:
        expected = [model.generate(**x, max_new_tokens=5, do_sample=False) for x in inputs]
        results: dict[int, list[torch.Tensor]] = {0: [], 1: []}

        def work(which: int) -> None:
            for _ in range(6):
                results[which].append(model.generate(**inputs[which], max_new_tokens=5, do_sample=False))

        threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        compiled.remove()
    for which in (0, 1):
        assert len(results[which]) == 6 and all(torch.equal(r, expected[which]) for r in results[which])
    assert "generate" not in model.__dict__  # remove() took the wrapper off


def test_a_forward_from_another_thread_during_generate_is_refused() -> None:
    model = tiny_llava_clip()
    compiled = compile_model(model, check_stdlib()["fastv"])
    inputs = make_inputs(model)
    errors: list[Exception] = []

    class Intruder(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            def forward() -> None:
                try:
                    with torch.no_grad():
                        model(**inputs)
                except PolicyError as error:
                    errors.append(error)

            thread = threading.Thread(target=forward)
            thread.start()
            thread.join()
            return scores

    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False, logits_processor=LogitsProcessorList([Intruder()]))
    finally:
        compiled.remove()
    assert errors and "inside a generate() call of another thread" in str(errors[0])
    assert "generate" not in model.__dict__
