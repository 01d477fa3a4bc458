"""Several images and videos per prompt, before the LLM: one budget per prompt split across its images and tiles
(`top(allocate=...)`, policies/globalcom2_style.tokpol) and temporal merging across video frames (`merge temporal`,
policies/holitom_temporal.tokpol) on Qwen2-VL videos, against the plain reference tests/reference/multi_image.py:
the same split, the same kept (and merged) tokens, the same generated tokens, first-step logits within 1e-5; padded
batches equal their rows run alone. LLaVA-OneVision's videos: tests/test_onevision_video.py."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch
from family_checks import assert_batch_equals_single_runs
from multi_image_cases import FAMILIES, Inputs, assert_equals_reference, kept_vision, llava_single_row
from policyc.passes.allocate import allocate
from reference.divprune import divprune_keep
from reference.multi_image import allocate_choice, split_budget, temporal_choice
from tiny_idefics3 import single_row
from tiny_internvl import single_internvl
from tiny_models import (
    PAD_ID,
    QWEN_END_ID,
    QWEN_IMAGE_ID,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_START_ID,
    QWEN_VIDEO_ID,
    qwen_single_row,
    tiny_llava_clip,
    tiny_qwen2_vl,
)

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source

# ---------------------------------------------------------------- the split itself

def test_the_split_sums_to_the_budget_caps_each_image_and_equals_the_reference() -> None:
    rng = random.Random(0)
    for _ in range(500):
        images = rng.randint(1, 6)
        sizes = [rng.choice([0, 1, 3, 16, 64]) for _ in range(images)]
        weights = [rng.choice([0.0, -1.0, rng.random(), 10 * rng.random()]) for _ in range(images)]
        budget = rng.randint(0, sum(sizes) + 5)
        counts = allocate(budget, weights, sizes)
        assert sum(counts) == min(budget, sum(sizes))
        assert all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))
        assert counts == split_budget(budget, list(weights), sizes)


def test_the_split_follows_the_weights() -> None:
    assert allocate(10, [3.0, 1.0, 1.0], [100, 100, 100]) == [6, 2, 2]
    assert allocate(10, [8.0, 1.0, 1.0], [3, 100, 100]) == [3, 4, 3]  # capped at 3; the rest split 1:1, tie earlier
    assert allocate(7, [0.0, 0.0], [5, 5]) == [4, 3]  # no weight: equal shares
    assert allocate(50, [1.0, 1.0], [5, 5]) == [5, 5]


# ---------------------------------------------------------------- allocation on each family

@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(("seed", "ratio", "batch"), [(0, 25, 1), (1, 40, 2)])
def test_globalcom2_style_equals_the_reference(family: str, seed: int, ratio: int, batch: int) -> None:
    """Each row keeps int(ratio * its image tokens) in all, split across its images by their summed isolation."""
    model, inputs, vision_ids, sizes = FAMILIES[family](batch, seed)
    kept = assert_equals_reference(model, inputs, vision_ids, sizes, lambda row: allocate_choice(float(ratio)),
                                    "globalcom2_style", {"ratio": f"{ratio}%"})
    vision = torch.isin(inputs["input_ids"], torch.tensor(vision_ids)) & inputs["attention_mask"].bool()
    for row in range(batch):
        assert kept[row].numel() == int(int(vision[row].sum()) * ratio / 100)


def test_a_flat_image_gives_its_budget_to_the_others() -> None:
    """A uniform image (its tokens alike: isolation near 0) keeps fewer tokens than its size's share; a small image
    full of distinct tokens is capped at its size; the rest goes to the third image (the reference's split)."""
    model, inputs, vision_ids, sizes = FAMILIES["qwen2_vl"](1, 1)
    inputs["pixel_values"][: 8 * 8] = 0.3  # the first image (8 x 8 patches) is flat
    kept = assert_equals_reference(model, inputs, vision_ids, sizes, lambda row: allocate_choice(40.0),
                                    "globalcom2_style", {"ratio": "40%"})[0]
    image = (inputs["input_ids"][0] == QWEN_IMAGE_ID).nonzero().flatten()
    per_image = [int(torch.isin(part, kept).sum()) for part in torch.split(image, sizes)]
    budget = int(sum(sizes) * 40 / 100)
    assert sum(per_image) == budget
    assert per_image[0] < budget * sizes[0] / sum(sizes) and per_image[2] == sizes[2]


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_an_equal_split_of_a_count_equals_the_reference(family: str) -> None:
    model, inputs, vision_ids, sizes = FAMILIES[family](2, 3)
    policy = check_source("""
policy equal_split {
  stage projector.output {
    keep top(allocate=equal) 11 of vision by diversity(features=hidden)
  }
}""")[0]
    kept = assert_equals_reference(model, inputs, vision_ids, sizes, lambda row: allocate_choice(11, "equal"),
                                    policy, {})
    assert [k.numel() for k in kept] == [11, 11]


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3"])
def test_diverse_with_an_equal_split_equals_divprune_per_image(family: str) -> None:
    """`diverse(allocate=equal) 40%`: each row's budget split equally across its images (largest remainder, capped),
    each image's share picked by DivPrune's greedy max-min (tests/reference/divprune.py)."""
    model, inputs, vision_ids, sizes = FAMILIES[family](2, 7)
    policy = check_source("""
policy split_divprune {
  stage projector.output {
    keep diverse(allocate=equal) 40% of vision by hidden
  }
}""")[0]

    def choose(row: int) -> Callable[[list[torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        def pick(images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            lengths = [f.shape[0] for f in images]
            counts = split_budget(int(sum(lengths) * 40 / 100), [1.0] * len(images), lengths)
            return [(divprune_keep(f[None], c)[0], f) for f, c in zip(images, counts, strict=True)]
        return pick

    assert_equals_reference(model, inputs, vision_ids, sizes, choose, policy, {})


@pytest.mark.parametrize(("family", "single"), [("qwen2_vl", qwen_single_row), ("internvl", single_internvl),
                                                ("idefics3", single_row), ("llava", llava_single_row)])
def test_allocation_batches_equal_single_runs(family: str, single: Callable[[Inputs, int], Inputs]) -> None:
    model, inputs, _, _ = FAMILIES[family](2, 5)
    assert_batch_equals_single_runs(model, "globalcom2_style", {"ratio": "30%"}, inputs, single, drops=True)


def test_allocation_in_encoder_stages_fails_at_compile_time() -> None:
    """The encoder sees each image on its own: a prompt's budget is split at projector.output or in the LLM
    (tests/test_image_sets.py)."""
    policy = check_source("""
policy early {
  stage encoder.layer[1] {
    keep top(allocate=equal) 50% of vision by key_norm
  }
}""", "early.tokpol")[0]
    with pytest.raises(PolicyError) as error:
        policyc.compile(tiny_llava_clip(), policy)
    assert "an encoder stage sees each image on its own: top(allocate=...)" in str(error.value)


# ---------------------------------------------------------------- temporal merging on Qwen2-VL videos

def make_video_inputs(batch: int = 1, videos: tuple[tuple[int, int, int], ...] = ((3, 8, 8),), pad_left: int = 0,
                      seed: int = 0, images: tuple[tuple[int, int], ...] = ()) -> Inputs:
    """Qwen2-VL video inputs as its processor gives them: per row, left padding, three text tokens, then per image of
    `images` (h x w patches) `<vision_start>`, h*w/4 image tokens, `<vision_end>`, then per video of (t, h, w) (t frame
    groups of temporal_patch_size frames, h x w patches) `<vision_start>`, t*h*w/4 video tokens, `<vision_end>`, then
    four text tokens; `mm_token_type_ids` marks image tokens with 1 and video tokens with 2. Each frame group is the
    previous one plus noise, small (0.05) on half of the 2x2 merge blocks and large (1.5) on the others, so that some
    tokens repeat across frames and others do not."""
    generator = torch.Generator().manual_seed(seed)
    pads = [pad_left if b > 0 else 0 for b in range(batch)]
    specials = {QWEN_IMAGE_ID, QWEN_VIDEO_ID, QWEN_START_ID, QWEN_END_ID, PAD_ID}
    text = torch.tensor([i for i in range(3, QWEN_START_ID) if i not in specials])
    rows, masks, pixels, image_pixels = [], [], [], []
    for pad in pads:
        before = 3 + min(pads) - pad
        picks = text[torch.randint(len(text), (before + 4,), generator=generator)].tolist()
        row = [PAD_ID] * pad + picks[:before]
        for h, w in images:
            row += [QWEN_START_ID] + [QWEN_IMAGE_ID] * (h * w // QWEN_MERGE**2) + [QWEN_END_ID]
            image_pixels.append(torch.randn(h * w, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=generator))
        for t, h, w in videos:
            row += [QWEN_START_ID] + [QWEN_VIDEO_ID] * (t * h * w // QWEN_MERGE**2) + [QWEN_END_ID]
            frame = torch.randn(h * w, 3 * 2 * QWEN_PATCH * QWEN_PATCH, generator=generator)
            for _ in range(t):
                pixels.append(frame)
                blocks = torch.rand(h * w // QWEN_MERGE**2, generator=generator) < 0.5
                scale = torch.where(blocks, 0.05, 1.5).repeat_interleave(QWEN_MERGE**2)
                frame = frame + scale[:, None] * torch.randn(frame.shape, generator=generator)
        row += picks[before:]
        rows.append(row)
        masks.append([0] * pad + [1] * (len(row) - pad))
    ids = torch.tensor(rows)
    inputs = {"input_ids": ids, "attention_mask": torch.tensor(masks),
              "mm_token_type_ids": (ids == QWEN_IMAGE_ID).long() + (ids == QWEN_VIDEO_ID).long() * 2,
              "pixel_values_videos": torch.cat(pixels),
              "video_grid_thw": torch.tensor([[t, h, w] for _ in pads for t, h, w in videos])}
    if images:
        inputs.update({"pixel_values": torch.cat(image_pixels),
                       "image_grid_thw": torch.tensor([[1, h, w] for _ in pads for h, w in images])})
    return inputs


VIDEOS = ((3, 8, 8), (2, 4, 8))  # two videos per row: 3 frame groups of 16 tokens, 2 of 8


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize(("seed", "threshold", "batch"), [(0, 0.9, 1), (1, 0.95, 2), (2, 0.8, 2)])
def test_holitom_temporal_equals_the_reference(version: str, seed: int, threshold: float, batch: int) -> None:
    model = tiny_qwen2_vl(seed=seed, version=version)
    inputs = make_video_inputs(batch=batch, videos=VIDEOS, pad_left=2, seed=seed)
    grids = inputs["video_grid_thw"]
    sizes = [int(t * h * w) // QWEN_MERGE**2 for t, h, w in grids]
    frames = [int(t) for t, _, _ in grids]
    kept = assert_equals_reference(model, inputs, [QWEN_VIDEO_ID], sizes,
                                    lambda row: temporal_choice(frames[row * 2:row * 2 + 2], threshold),
                                    "holitom_temporal", {"threshold": threshold})
    merged = sum(sizes) // batch
    assert all(0 < k.numel() < merged for k in kept)  # some tokens merged, not all


def test_holitom_temporal_batches_equal_single_runs() -> None:
    inputs = make_video_inputs(batch=2, videos=VIDEOS, pad_left=2, seed=4)
    assert_batch_equals_single_runs(tiny_qwen2_vl(), "holitom_temporal", {"threshold": 0.9}, inputs, qwen_single_row,
                                    drops=True)


def image_then_videos(frames: list[int], threshold: float) -> Callable[[list[torch.Tensor]], list]:
    """A row's parts in prompt order (its image, then its videos): the image left alone, each video merged across
    its frames by the reference."""
    def choose(parts: list[torch.Tensor]) -> list:
        image, *videos = parts
        return [(torch.ones(len(image), dtype=torch.bool), image), *temporal_choice(frames, threshold)(videos)]
    return choose


@pytest.mark.parametrize("version", ["2", "2.5"])
@pytest.mark.parametrize(("seed", "threshold", "batch"), [(0, 0.9, 1), (1, 0.85, 2)])
def test_holitom_temporal_on_a_prompt_with_an_image_and_videos_equals_the_reference(
        version: str, seed: int, threshold: float, batch: int) -> None:
    """Qwen2-VL encodes a prompt's images and videos in two tower forwards: each hands the LLM its own
    placeholders' kept flags, so videos merge across frames and the image beside them stays whole."""
    model = tiny_qwen2_vl(seed=seed, version=version)
    inputs = make_video_inputs(batch=batch, videos=VIDEOS, pad_left=2, seed=seed, images=((4, 8),))
    frames = [int(t) for t, _, _ in VIDEOS]
    sizes = [n for _ in range(batch) for n in (8, *(t * h * w // QWEN_MERGE**2 for t, h, w in VIDEOS))]
    kept = assert_equals_reference(model, inputs, [QWEN_IMAGE_ID, QWEN_VIDEO_ID], sizes,
                                   lambda row: image_then_videos(frames, threshold), "holitom_temporal",
                                   {"threshold": threshold})
    image, video = inputs["input_ids"] == QWEN_IMAGE_ID, inputs["input_ids"] == QWEN_VIDEO_ID
    for row, k in enumerate(kept):
        assert int(image[row, k].sum()) == 8  # the image: nothing merges
        assert 0 < int(video[row, k].sum()) < int(video[row].sum())  # some video tokens merged, not all


@pytest.mark.parametrize(("policy", "params"), [("divprune", {"ratio": "30%"}), ("random_drop", {"ratio": "40%"}),
                                                ("holitom_temporal", {"threshold": 0.9})])
def test_padded_batches_with_an_image_and_videos_equal_single_runs(policy: str, params: dict) -> None:
    inputs = make_video_inputs(batch=2, videos=VIDEOS, pad_left=2, seed=6, images=((4, 8),))
    assert_batch_equals_single_runs(tiny_qwen2_vl(seed=6), policy, params, inputs, qwen_single_row, drops=True)


def test_divprune_thins_the_image_and_each_video_of_a_prompt() -> None:
    """DivPrune at projector.output keeps its share of every image and video of a prompt holding both."""
    model = tiny_qwen2_vl(seed=3)
    inputs = make_video_inputs(batch=1, videos=VIDEOS, pad_left=0, seed=3, images=((4, 8),))
    policyc.compile(model, "divprune", ratio="50%")
    model.generate(**inputs, max_new_tokens=2, do_sample=False)
    kept = kept_vision(model, inputs, [QWEN_IMAGE_ID, QWEN_VIDEO_ID])[0]
    ids = inputs["input_ids"][0, kept]
    assert int((ids == QWEN_IMAGE_ID).sum()) == 4
    assert int((ids == QWEN_VIDEO_ID).sum()) == sum(t * h * w // QWEN_MERGE**2 // 2 for t, h, w in VIDEOS)


def test_allocation_before_the_llm_refuses_a_prompt_holding_images_and_videos() -> None:
    """The image forward cannot number its images among the videos of the same prompt: a loud error, not a split
    over the images alone."""
    model = tiny_qwen2_vl(seed=2)
    inputs = make_video_inputs(batch=1, videos=VIDEOS, seed=2, images=((4, 8),))
    policyc.compile(model, "globalcom2_style")
    with pytest.raises(PolicyError, match="a prompt holds images and videos, which this model encodes in two"):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    model.policyc.remove()


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
def test_temporal_merging_leaves_images_alone(family: str) -> None:
    """An image is one frame: nothing merges (Qwen2-VL images; LLaVA has no videos)."""
    model, inputs, _, _ = FAMILIES[family](2, 6)
    policyc.compile(model, "holitom_temporal", threshold=0.0)
    tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    model.policyc.remove()
    del model.policyc
    assert torch.equal(tokens, model.generate(**inputs, max_new_tokens=3, do_sample=False))
