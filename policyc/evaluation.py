"""`policyc eval`: what a policy costs in accuracy, measured against the unmodified model.

A data set is a list of (image, question, answers) items: the synthetic scenes of policyc.vqa (a split,
generated on the fly) or a JSONL file of {"image": PATH, "question": TEXT, "answer": TEXT or [TEXT, ...]}
(image paths relative to the file). Answers are generated greedily and scored two ways: exact match of
the normalized first word against the first answer, and the VQA score min(1, matching answers / 3) over
all given answers. Each prompt's prefill is measured too: image tokens reaching the LLM and its analytic
FLOPs share (policyc.report).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from policyc.errors import PolicyError
from policyc.vqa.accuracy import normalize


@dataclass(frozen=True)
class Item:
    image: Image.Image
    question: str
    answers: tuple[str, ...]  # the first is the reference for exact match
    kind: str = ""


@dataclass(frozen=True)
class Prediction:
    item: Item
    predicted: str
    flops_share: float  # analytic prefill FLOPs after / before (1.0 without a policy)
    image_tokens: int  # image tokens the LLM's last layer still sees
    kv_share: float = 1.0  # KV cache entries after prefill, summed over layers, over the unmodified model's

    @property
    def exact(self) -> float:
        return float(self.predicted == normalize(self.item.answers[0]))

    @property
    def vqa(self) -> float:
        return min(1.0, sum(self.predicted == normalize(a) for a in self.item.answers) / 3) \
            if len(self.item.answers) > 1 else self.exact


@dataclass
class Evaluation:
    name: str  # the policy, or "unmodified"
    predictions: list[Prediction] = field(default_factory=list)

    def mean(self, value: Callable[[Prediction], float]) -> float:
        return sum(value(p) for p in self.predictions) / len(self.predictions) if self.predictions else 0.0

    @property
    def accuracy(self) -> float:
        return self.mean(lambda p: p.exact)

    @property
    def vqa_score(self) -> float:
        return self.mean(lambda p: p.vqa)

    @property
    def flops_share(self) -> float:
        return self.mean(lambda p: p.flops_share)

    @property
    def image_tokens(self) -> float:
        return self.mean(lambda p: p.image_tokens)

    @property
    def kv_share(self) -> float:
        return self.mean(lambda p: p.kv_share)

    def by_kind(self) -> dict[str, float]:
        kinds = sorted({p.item.kind for p in self.predictions if p.item.kind})
        return {k: sum(p.exact for p in self.predictions if p.item.kind == k)
                / sum(p.item.kind == k for p in self.predictions) for k in kinds}

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.name, "samples": len(self.predictions), "accuracy": self.accuracy,
                "vqa_score": self.vqa_score, "flops_share": self.flops_share, "kv_share": self.kv_share,
                "image_tokens_in_last_layer": self.image_tokens, "accuracy_by_kind": self.by_kind()}


def synthetic_items(split: str = "test", limit: int = 500) -> list[Item]:
    from policyc.vqa.scenes import samples

    return [Item(s.scene.render(), s.question, (s.answer,), s.kind) for s in samples(split, limit)]


def jsonl_items(path: Path, limit: int | None = None) -> list[Item]:
    """Items of a JSONL file; every malformed line fails with its line number."""
    items: list[Item] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise PolicyError.at(f"cannot read the data set {path}: {error.strerror}", None) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PolicyError.at(f"{where}: not JSON ({error.msg})", None) from None
        if not isinstance(record, dict) or not {"image", "question", "answer"} <= set(record):
            raise PolicyError.at(f"{where}: each line needs \"image\", \"question\" and \"answer\"", None)
        answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
        if not answers or not all(isinstance(a, str) for a in answers):
            raise PolicyError.at(f"{where}: \"answer\" must be a string or a non-empty list of strings", None)
        image_path = (path.parent / str(record["image"])).resolve()
        try:
            image = Image.open(image_path).convert("RGB")
        except (OSError, ValueError) as error:
            raise PolicyError.at(f"{where}: cannot read the image {image_path}: {error}", None) from None
        items.append(Item(image, str(record["question"]), tuple(answers), str(record.get("kind", ""))))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise PolicyError.at(f"the data set {path} holds no items", None)
    return items


def load_items(data: str, split: str = "test", limit: int | None = None) -> list[Item]:
    """`synthetic` (policyc's scenes) or a JSONL file."""
    if data == "synthetic":
        return synthetic_items(split, 500 if limit is None else limit)
    path = Path(data).expanduser()
    if path.suffix == ".jsonl":
        return jsonl_items(path, limit)
    raise PolicyError.at(f"unknown data set '{data}'", None,
                         "give `synthetic` or a .jsonl file of {image, question, answer} lines")


def render_messages(processor: Any, messages: Sequence[dict[str, Any]]) -> str:
    """Chat messages (content items `{"type": "image"}` and `{"type": "text", "text": ...}`) as the prompt text:
    the processor's chat template if it has one, else each image token on its own line before the text."""
    if getattr(processor, "chat_template", None):
        return processor.apply_chat_template(list(messages), add_generation_prompt=True)
    image = f"{getattr(processor, 'image_token', '<image>')}\n"
    return "".join(image if item["type"] == "image" else item["text"]
                   for message in messages for item in message["content"])


def prompt_text(processor: Any, question: str, images: int = 1) -> str:
    """The prompt for `question` about `images` images, the images first."""
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return render_messages(processor, [{"role": "user", "content": content}])


@dataclass(frozen=True)
class Answer:
    """One row of a batch: the generated text and what its prefill cost."""

    text: str  # the decoded continuation, special tokens skipped
    new_tokens: int  # tokens generated, not counting the pad token (nor the end token where it is the pad token)
    prompt_tokens: int  # tokens of the prompt (its padding excluded)
    flops_share: float  # analytic prefill FLOPs after / before (1.0 without a policy)
    image_tokens: int  # image tokens the LLM's last layer still sees
    kv_share: float  # KV cache entries after prefill over the unmodified model's


@torch.no_grad()
def answer_batch(model: Any, processor: Any, images: Sequence[Sequence[Any]], prompts: Sequence[str],
                 compiled: Any | None = None, name: str = "unmodified", **generate: Any) -> list[Answer]:
    """`generate()` on a left-padded batch of `prompts` (`images`: each prompt's images, in order), then each
    row's answer and prefill cost (policyc.report) under `compiled`, the policy compiled onto `model` if any."""
    from policyc.report import report_from_last_prefill

    device = next(model.parameters()).device
    nested = [list(i) for i in images] if any(images) else None  # per prompt, as every processor takes them
    inputs = processor(images=nested, text=list(prompts), padding=True, return_tensors="pt")
    inputs = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    out = model.generate(**inputs, **generate)
    new = out[:, inputs["input_ids"].shape[1]:]
    texts = processor.tokenizer.batch_decode(new, skip_special_tokens=True)
    mask = inputs.get("attention_mask")
    pad = getattr(model.generation_config, "pad_token_id", None)
    answers = []
    for row, text in enumerate(texts):
        prompt_tokens = int(mask[row].sum()) if mask is not None else inputs["input_ids"].shape[1]
        new_tokens = int((new[row] != pad).sum()) if pad is not None else new.shape[1]
        if compiled is None:
            share, kv, tokens = 1.0, 1.0, int((inputs["input_ids"][row] == model.config.image_token_id).sum())
        else:
            report = report_from_last_prefill(compiled, inputs["input_ids"], name, row=row, attention_mask=mask)
            share = report.flops_after.total / report.flops_before.total
            kv = report.kv_share
            tokens = report.kept[-1].after if report.kept else report.image_tokens
        answers.append(Answer(text, new_tokens, prompt_tokens, share, tokens, kv))
    return answers


def evaluate(model: Any, processor: Any, items: Sequence[Item], compiled: Any | None = None,
             name: str = "unmodified", batch_size: int = 16, max_new_tokens: int = 8,
             progress: Callable[[int], None] | None = None) -> Evaluation:
    """Greedy answers of `model` (compiled with a policy or not) to `items`, scored, with each prefill's cost."""
    result = Evaluation(name)
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        answers = answer_batch(model, processor, [[i.image] for i in batch],
                               [prompt_text(processor, i.question) for i in batch], compiled, name,
                               max_new_tokens=max_new_tokens, do_sample=False)
        for item, a in zip(batch, answers, strict=True):
            result.predictions.append(Prediction(item, normalize(a.text), a.flops_share, a.image_tokens, a.kv_share))
        if progress is not None:
            progress(len(batch))
    return result


def retention(policy: Evaluation, unmodified: Evaluation) -> float | None:
    """The policy's accuracy as a share of the unmodified model's (None when that is zero)."""
    return policy.accuracy / unmodified.accuracy if unmodified.accuracy > 0 else None
