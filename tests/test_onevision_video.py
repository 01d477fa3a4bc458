"""Projector stages on LLaVA-OneVision videos: a video is one image to `projector.output` stages (its frames' 2x2-pooled
tokens, frame after frame, then one newline that is no candidate and always reaches the LLM), so DivPrune and random
pruning drop video tokens too, and `merge temporal` (policies/holitom_temporal.tokpol) merges a video token into the
token at its place in the previous frame. Images in the same prompt run through the same stages in their own forward
(temporal merging leaves them alone). Against plain references run on the unmodified model
(tests/reference/before_llm.py: the shorter prompt; tests/reference/multi_image.py: the merged features): the same
kept tokens, the same generated tokens, logits within 1e-5; padded batches equal their rows alone; a projector stage
keeping everything is bit-exact."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from family_checks import assert_batch_equals_single_runs, greedy
from reference.before_llm import before_llm_run
from reference.divprune import divprune_keep
from reference.multi_image import RowChoice, generate, temporal_merge
from tiny_llava_next import IMAGE_ID, PAD_ID, PATCH, SIZE, VIDEO_ID, make_anyres_inputs, single_row, tiny_anyres

import policyc
from policyc.compiler.plan import lower
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt
from policyc.runtime.support import check_supported

Inputs = dict[str, torch.Tensor]
IMAGES = [[(64, 64)], [(30, 64), (20, 20)]]  # row 0: one anyres image; row 1: two base-view images
FRAMES = 3
POOLED = ((SIZE // PATCH + 1) // 2) ** 2  # a frame's tokens: the 4x4 patch grid pooled 2x2
VIDEO_TOKENS = FRAMES * POOLED + 1  # and one newline


def moving_frames(videos: int, seed: int) -> torch.Tensor:
    """[videos, FRAMES, 3, 32, 32]: each frame is the previous one plus noise, small (0.05) on some of the 16x16
    blocks behind one pooled token and large (1.5) on the others, so some tokens repeat across frames and others
    do not."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(videos):
        frame = torch.randn(3, SIZE, SIZE, generator=generator)
        frames = [frame]
        for _ in range(FRAMES - 1):
            still = torch.rand(2, 2, generator=generator) < 0.5
            scale = torch.where(still, 0.05, 1.5).repeat_interleave(SIZE // 2, 0).repeat_interleave(SIZE // 2, 1)
            frame = frame + scale * torch.randn(3, SIZE, SIZE, generator=generator)
            frames.append(frame)
        out.append(torch.stack(frames))
    return torch.stack(out)


def without_images(inputs: Inputs) -> Inputs:
    """The same rows with their images taken out (text and video only), left-padded again."""
    rows = [ids[valid.bool() & (ids != IMAGE_ID)].tolist() for ids, valid in
            zip(inputs["input_ids"], inputs["attention_mask"], strict=True)]
    width = max(len(r) + (2 if b else 0) for b, r in enumerate(rows))
    return {"input_ids": torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows]),
            "pixel_values_videos": inputs["pixel_values_videos"]}


def video_inputs(model: torch.nn.Module, batch: int, seed: int, images: bool = True) -> Inputs:
    """Per row: text, one 3-frame video (`<video>` x 13), the row's images (`IMAGES`), text; left-padded."""
    inputs = make_anyres_inputs(model, IMAGES[:batch], (FRAMES,) * batch, pad_left=2, seed=seed)
    inputs["pixel_values_videos"] = moving_frames(batch, seed)
    return inputs if images else without_images(inputs)


def run_sizes(model: torch.nn.Module, inputs: Inputs) -> list[list[int]]:
    """Per row, the tokens of each of its images and videos in prompt order: the video, then the images."""
    rows = inputs["input_ids"].shape[0]
    if "pixel_values" not in inputs:
        return [[VIDEO_TOKENS] for _ in range(rows)]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                  image_sizes=inputs["image_sizes"],
                                                  batch_num_images=inputs["batch_num_images"]).pooler_output
    sizes = iter(len(f) for f in features)
    return [[VIDEO_TOKENS, *(next(sizes) for _ in IMAGES[row])] for row in range(rows)]


def kept_vision(model: torch.nn.Module, inputs: Inputs) -> list[torch.Tensor]:
    """Per row, the image and video positions alive after prefill."""
    vision = torch.isin(inputs["input_ids"], torch.tensor([IMAGE_ID, VIDEO_ID]))
    live = model.policyc.runtime.state.live()  # None unless rows kept different counts (fillers)
    rows = []
    for row in range(inputs["input_ids"].shape[0]):
        kept = model.policyc.kept_positions[row]
        kept = kept if live is None else kept[live[row]]
        rows.append(kept[vision[row, kept]])
    return rows


def test_the_adapter_reads_video_frames() -> None:
    adapter = adapt(tiny_anyres("llava_onevision"))
    assert adapter.reads_video_frames and adapter.video_token_id == VIDEO_ID and adapter.pooled_grid == (2, 2)


@pytest.mark.parametrize(("seed", "ratio", "batch", "images"), [
    (0, 50, 1, True), (1, 25, 2, True), (2, 75, 2, True), (3, 40, 2, False)])
def test_divprune_on_videos_equals_the_shorter_prompt(seed: int, ratio: int, batch: int, images: bool) -> None:
    """DivPrune keeps int(ratio * 12) of a video's 12 frame tokens by max-min diversity over the whole video, and
    its share of each image's tokens; newlines of images and videos are no candidates and all reach the LLM."""
    model = tiny_anyres("llava_onevision", seed=seed)
    inputs = video_inputs(model, batch, seed, images)
    newline = model.model.image_newline.detach()
    expected_tokens, expected_kept, expected_logits = before_llm_run(
        model, inputs, (IMAGE_ID, VIDEO_ID), run_sizes(model, inputs),
        lambda f: divprune_keep(f[None], int(f.shape[0] * ratio / 100))[0], max_new_tokens=5,
        candidates=lambda f: ~(f == newline).all(-1))
    policyc.compile(model, "divprune", ratio=f"{ratio}%")
    try:
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        kept = kept_vision(model, inputs)
    finally:
        model.policyc.remove()
    video = inputs["input_ids"] == VIDEO_ID
    for row, expected in enumerate(expected_kept):
        assert torch.equal(kept[row], expected)
        assert int(video[row, kept[row]].sum()) == int(FRAMES * POOLED * ratio / 100) + 1  # + the newline
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], expected_tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), expected_logits, rtol=0, atol=1e-5)


def video_then_images(threshold: float) -> RowChoice:
    """A row's parts (its video, then its images): the video's frame tokens merged across frames by the reference
    (its newline on no frame: kept as it is), the images left alone."""
    def choose(parts: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        video, *images = parts
        kept, merged = temporal_merge(video[:-1], FRAMES, threshold)
        out = [(torch.cat([kept, torch.ones(1, dtype=torch.bool)]), torch.cat([merged, video[-1:]]))]
        return out + [(torch.ones(len(f), dtype=torch.bool), f) for f in images]
    return choose


@pytest.mark.parametrize(("seed", "threshold", "batch", "images"), [
    (0, 0.9, 1, True), (1, 0.8, 2, True), (2, 0.95, 2, True), (0, 0.85, 2, False)])
def test_holitom_temporal_on_videos_equals_the_reference(seed: int, threshold: float, batch: int,
                                                         images: bool) -> None:
    """Each video token joins the run of the token at its place in the previous frame when their cosine exceeds
    the threshold; a run becomes its mean in its first frame's slot. Images (one frame) are unchanged."""
    model = tiny_anyres("llava_onevision", seed=seed)
    inputs = video_inputs(model, batch, seed, images)
    sizes = [n for row in run_sizes(model, inputs) for n in row]
    expected_tokens, expected_kept, expected_logits = generate(
        model, inputs, [IMAGE_ID, VIDEO_ID], sizes, lambda row: video_then_images(threshold), max_new_tokens=4)
    policyc.compile(model, "holitom_temporal", threshold=threshold)
    try:
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        kept = kept_vision(model, inputs)
    finally:
        model.policyc.remove()
    image, video = inputs["input_ids"] == IMAGE_ID, inputs["input_ids"] == VIDEO_ID
    for row, expected in enumerate(expected_kept):
        assert torch.equal(kept[row], expected)
        assert int(image[row, kept[row]].sum()) == int(image[row].sum())  # images: nothing merges
        assert 1 + POOLED < int(video[row, kept[row]].sum()) < VIDEO_TOKENS  # some frame tokens merged, not all
    assert torch.equal(out.sequences[:, inputs["input_ids"].shape[1]:], expected_tokens)
    torch.testing.assert_close(out.logits[0], expected_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("policy", "params"), [("divprune", {"ratio": "30%"}), ("todre", {"ratio": "30%"}),
                                                ("random_drop", {"ratio": "40%"}),
                                                ("holitom_temporal", {"threshold": 0.85})])
def test_padded_batches_with_videos_equal_single_runs(policy: str, params: dict) -> None:
    model = tiny_anyres("llava_onevision", seed=5)
    inputs = video_inputs(model, 2, 5)
    assert_batch_equals_single_runs(model, policy, params, inputs, single_row, drops=True)


def test_random_drop_keeps_its_share_of_every_video() -> None:
    model = tiny_anyres("llava_onevision", seed=6)
    inputs = video_inputs(model, 2, 6, images=False)
    policyc.compile(model, "random_drop", ratio="50%")
    try:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept = kept_vision(model, inputs)
    finally:
        model.policyc.remove()
    newline = [(row == VIDEO_ID).nonzero().flatten()[-1] for row in inputs["input_ids"]]
    assert [k.numel() for k in kept] == [FRAMES * POOLED // 2 + 1] * 2
    assert all(int(n) in k.tolist() for n, k in zip(newline, kept, strict=True))


KEEP_ALL = """
policy keep_all {
  stage projector.output {
    merge temporal(threshold=1) of vision by hidden
    keep top 100% of vision by random(seed=0)
  }
}"""


@pytest.mark.parametrize("images", [True, False])
def test_a_projector_stage_keeping_every_video_token_is_bit_exact(images: bool) -> None:
    """Temporal merging that merges nothing and a drop keeping everything (their machinery runs on the video and
    image rows): the unmodified model's tokens and bit-identical scores at every step, padded batch of 2."""
    model = tiny_anyres("llava_onevision", seed=7)
    inputs = video_inputs(model, 2, 7, images)
    plain = greedy(model, inputs, 5)
    policyc.compile(model, check_source(KEEP_ALL)[0])
    try:
        compiled = greedy(model, inputs, 5)
        assert model.policyc.runtime.image_slots[0].all()
    finally:
        model.policyc.remove()
    assert torch.equal(plain.sequences, compiled.sequences)
    assert all(torch.equal(a, b) for a, b in zip(plain.scores, compiled.scores, strict=True))


def test_temporal_merging_fails_at_compile_time_where_video_frames_are_not_read() -> None:
    """A family with videos whose frames its projector stages do not read gets a compile error, never a no-op."""
    adapter = dataclasses.replace(adapt(tiny_anyres("llava_onevision")), reads_video_frames=False)
    plan = lower(policyc.parse("holitom_temporal"), adapter)
    with pytest.raises(PolicyError, match="merge temporal needs the video frames of the model"):
        check_supported(plan)
