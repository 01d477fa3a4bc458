"""Exact-match accuracy of a LLaVA model on synthetic scenes: greedy answers, compared word for word."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from policyc.vqa.model import prompt_text
from policyc.vqa.scenes import Sample


@dataclass(frozen=True)
class Answered:
    sample: Sample
    predicted: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.sample.answer


def normalize(text: str) -> str:
    """The first word of an answer, lower case, without punctuation."""
    words = text.strip().lower().split()
    return words[0].strip(".,!?") if words else ""


def answer(model: Any, processor: Any, batch: Sequence[Sample], max_new_tokens: int = 8) -> list[Answered]:
    """Greedy answers to a batch of samples (left-padded prompts, as generate() expects), through the batch
    function `policyc eval` uses."""
    from policyc.evaluation import answer_batch

    answers = answer_batch(model, processor, [[s.scene.render()] for s in batch],
                           [prompt_text(processor, s.question) for s in batch],
                           max_new_tokens=max_new_tokens, do_sample=False)
    return [Answered(s, normalize(a.text)) for s, a in zip(batch, answers, strict=True)]


def accuracy(model: Any, processor: Any, items: Iterable[Sample], batch_size: int = 32) -> tuple[float, list[Answered]]:
    """Share of exactly matched answers, and every answer."""
    results: list[Answered] = []
    pending: list[Sample] = []
    for item in items:
        pending.append(item)
        if len(pending) == batch_size:
            results += answer(model, processor, pending)
            pending = []
    if pending:
        results += answer(model, processor, pending)
    return (sum(r.correct for r in results) / len(results) if results else 0.0), results
