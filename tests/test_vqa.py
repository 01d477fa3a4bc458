"""Synthetic visual QA: samples are a pure function of (split, index), answers follow from the scene,
images show what the scene says, and training batches supervise the answer tokens only."""

from __future__ import annotations

import pytest
import torch

from policyc.vqa.accuracy import normalize
from policyc.vqa.model import IGNORE, prompt_text, training_batch, vqa_processor
from policyc.vqa.scenes import CELLS, COLORS, KINDS, NUMBERS, SHAPES, sample, samples, scene_questions


def test_samples_are_reproducible_and_splits_differ() -> None:
    first = [(s.question, s.answer, s.scene) for s in samples("test", 20)]
    again = [(s.question, s.answer, s.scene) for s in samples("test", 20)]
    assert first == again
    train = [(s.question, s.scene) for s in samples("train", 20)]
    assert sum(a[:2] == b for a, b in zip(first, train, strict=True)) == 0
    with pytest.raises(ValueError, match="unknown split"):
        sample("dev", 0)


@pytest.mark.parametrize("index", range(60))
def test_each_answer_follows_from_the_scene(index: int) -> None:
    item = sample("validation", index)
    shapes = item.scene.shapes
    assert item.kind == KINDS[index % len(KINDS)] and 2 <= len(shapes) <= 5
    assert len({s.cell for s in shapes}) == len(shapes)  # one shape per cell
    words = item.question.split()
    if item.kind == "color":
        kind = words[-2]
        assert [s.color for s in shapes if s.kind == kind] == [item.answer]
    elif item.kind == "shape":
        cell = CELLS.index(item.question.removeprefix("what shape is at the ").removesuffix(" ?"))
        assert [s.kind for s in shapes if s.cell == cell] == [item.answer]
    elif item.kind == "count":
        assert NUMBERS.index(item.answer) == sum(f"{s.kind}s" == words[2] for s in shapes)
    elif item.kind == "exists":
        color, kind = words[3], words[4]
        assert item.answer == ("yes" if any((s.color, s.kind) == (color, kind) for s in shapes) else "no")
    else:
        a = [s for s in shapes if (s.color, s.kind) == (words[2], words[3])]
        b = [s for s in shapes if (s.color, s.kind) == (words[-3], words[-2])]
        assert len(a) == len(b) == 1 and a[0].column != b[0].column
        assert item.answer == ("yes" if a[0].column < b[0].column else "no")
    assert item.answer in {*COLORS, *SHAPES, *NUMBERS, "yes", "no"}


def test_the_image_shows_each_shape_in_its_colour() -> None:
    for item in samples("train", 10):
        image = item.scene.render()
        assert image.size == (96, 96)
        for shape in item.scene.shapes:
            assert image.getpixel((shape.x, shape.y + 2)) == COLORS[shape.color]


def test_training_batches_supervise_only_the_answers() -> None:
    processor = vqa_processor()
    scenes = [scene_questions("train", i) for i in range(3)]
    batch = training_batch(processor, scenes)
    assert batch["pixel_values"].shape == (3, 3, 96, 96)
    eos = processor.tokenizer.eos_token_id
    for row, (scene, questions) in enumerate(scenes):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        assert int((ids == 3).sum()) == 144  # 12 x 12 image tokens
        assert len(questions) >= 4 and len({q for q, _ in questions}) == len(questions)
        supervised = labels[labels != IGNORE]
        assert processor.tokenizer.decode(supervised) == " ".join(f"{a} </s>" for _, a in questions)
        assert torch.equal(ids[labels != IGNORE], supervised)
        real = int(mask.sum())
        assert bool(mask[:real].all()) and not bool(mask[real:].any())  # padded on the right
        # the first question is the inference prompt, token for token
        first_answer = int((labels != IGNORE).nonzero()[0])
        prompt = processor(images=scene.render(), text=prompt_text(processor, questions[0][0]),
                           return_tensors="pt")["input_ids"][0]
        assert torch.equal(ids[:first_answer], prompt) and int(ids[first_answer + 1]) == eos


def test_the_tokenizer_knows_every_word_of_the_task() -> None:
    tokenizer = vqa_processor().tokenizer
    for item in samples("validation", 40):
        ids = tokenizer(f"{item.question} {item.answer}", add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids and len(ids) == len(f"{item.question} {item.answer}".split())
    assert tokenizer.decode(tokenizer("What COLOR is it?")["input_ids"], skip_special_tokens=False) \
        == "<s> what color is <unk> ?"


def test_answers_are_normalized_to_their_first_word() -> None:
    assert normalize(" Yes.") == "yes" and normalize("red circle") == "red" and normalize("  ") == ""
