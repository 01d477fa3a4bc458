"""Exact-match accuracy of a LLaVA model on synthetic scenes: greedy answers, compared word for word."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

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


@torch.no_grad()
def answer(model: Any, processor: Any, batch: Sequence[Sample], max_new_tokens: int = 8) -> list[Answered]:
    """Greedy answers to a batch of samples (left-padded prompts, as generate() expects)."""
    device = next(model.parameters()).device
    inputs = processor(images=[s.scene.render() for s in batch],
                       text=[prompt_text(processor, s.question) for s in batch], padding=True, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    texts = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [Answered(s, normalize(t)) for s, t in zip(batch, texts, strict=True)]


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
