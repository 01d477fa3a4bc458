"""One image of a prompt (`vision[i]`), each token's image (`image`) and frame (`frame`), at projector.output and
in the LLM, on every family with several images (or tiles) per prompt: the tokens each image holds equal the
model's own split of the prompt, and policies that touch one image equal plain references (FastV restricted to one
image, tests/reference/fastv.py; one image thinned before the LLM, tests/reference/multi_image.py)."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_batch_equals_single_runs
from multi_image_cases import FAMILIES, Inputs, assert_equals_reference, kept_vision, llava_single_row
from reference.fastv import fastv_generate
from reference.fastv import top_indices as ref_top
from reference.multi_image import isolation, split_budget, top_indices
from test_multi_image import VIDEOS, make_video_inputs
from tiny_gemma3 import GEMMA_IMAGE_ID, IMAGE_TOKENS, make_gemma3_inputs, single_gemma3, tiny_gemma3
from tiny_idefics3 import single_row
from tiny_internvl import single_internvl
from tiny_llava_next import IMAGE_ID as ANYRES_IMAGE_ID
from tiny_llava_next import VIDEO_ID as ANYRES_VIDEO_ID
from tiny_llava_next import make_anyres_inputs, tiny_anyres
from tiny_llava_next import single_row as single_anyres
from tiny_models import IMAGE_TOKEN_ID, QWEN_MERGE, QWEN_VIDEO_ID, qwen_single_row, tiny_qwen2_vl

import policyc
from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.models import adapt

SINGLE = {"qwen2_vl": qwen_single_row, "qwen2_5_vl": qwen_single_row, "idefics3": single_row,
          "internvl": single_internvl, "llava": llava_single_row, "gemma3": single_gemma3,
          "llava_next": single_anyres, "llava_onevision": single_anyres}


def _runs(inputs: Inputs, token: int) -> list[int]:
    """The lengths of the runs of `token` in the batch, row after row (each run one image)."""
    sizes = []
    for row in inputs["input_ids"].tolist():
        for previous, current in zip([None, *row], row, strict=False):
            if current == token and previous == token:
                sizes[-1] += 1
            elif current == token:
                sizes.append(1)
    return sizes


def _gemma3(batch: int, seed: int) -> tuple[torch.nn.Module, Inputs, list[int], list[int]]:
    inputs = make_gemma3_inputs(batch=batch, images=3, pad_left=2, seed=seed)
    return tiny_gemma3(seed=seed), inputs, [GEMMA_IMAGE_ID], [IMAGE_TOKENS] * (3 * batch)


def _anyres(family: str):
    def build(batch: int, seed: int) -> tuple[torch.nn.Module, Inputs, list[int], list[int]]:
        model = tiny_anyres(family, seed=seed)
        inputs = make_anyres_inputs(model, [[(40, 24), (30, 64)], [(30, 64), (20, 20)]][:batch], pad_left=2,
                                    seed=seed)
        return model, inputs, [ANYRES_IMAGE_ID], _runs(inputs, ANYRES_IMAGE_ID)
    return build


# Families whose images are only told apart in the LLM here (their projector stages take other paths).
ALL_FAMILIES = {**FAMILIES, "gemma3": _gemma3, "llava_next": _anyres("llava_next"),
                "llava_onevision": _anyres("llava_onevision")}


def _policy(stage: str, body: str) -> policyc.lang.ir.Policy:
    return check_source(f"policy one_image {{\n  stage {stage} {{\n{body}\n  }}\n}}", "one_image.tokpol")[0]


def _image_spans(inputs: Inputs, vision_ids: list[int], sizes: list[int]) -> list[list[torch.Tensor]]:
    """Per row, the positions of each of its images: the row's vision tokens in order, cut by `sizes` (the
    images of the whole batch in prompt order), as the model scatters them."""
    vision = torch.isin(inputs["input_ids"], torch.tensor(vision_ids)) & inputs["attention_mask"].bool()
    spans, cursor = [], 0
    for row in vision:
        positions, start, images = row.nonzero().flatten(), 0, []
        while start < len(positions):
            images.append(positions[start:start + sizes[cursor]])
            start, cursor = start + sizes[cursor], cursor + 1
        spans.append(images)
    return spans


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_each_token_belongs_to_the_image_the_model_gives_it(family: str) -> None:
    model, inputs, vision_ids, sizes = ALL_FAMILIES[family](2, 0)
    order = adapt(model).image_index(inputs["input_ids"])
    for row, images in enumerate(_image_spans(inputs, vision_ids, sizes)):
        expected = torch.full_like(order[row], -1)
        for index, positions in enumerate(images):
            expected[positions] = index
        assert torch.equal(order[row], expected)


# ---------------------------------------------------------------- in the LLM

@pytest.mark.parametrize(("index", "image", "batch"), [("1", 1, 1), ("1", 1, 2), ("-1", 2, 2)])
def test_fastv_on_one_image_equals_the_reference(index: str, image: int, batch: int) -> None:
    """`protect vision - vision[i]` then FastV's keep on `vision[i]`: FastV ranking only image i's tokens (the
    attention of the last prompt token at layer 1), the other images kept like text."""
    model, inputs, _, sizes = FAMILIES["llava"](batch, 2)
    spans = _image_spans(inputs, [IMAGE_TOKEN_ID], sizes)
    candidates = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for row, images in enumerate(spans):
        candidates[row, images[image]] = True
    expected_tokens, expected_kept = fastv_generate(model, inputs["input_ids"], inputs["attention_mask"],
                                                    inputs["pixel_values"], layer=1, keep=5, max_new_tokens=4,
                                                    candidates=candidates)
    policy = _policy("llm.layer[1]", f"    protect vision - vision[{index}]\n"
                                     f"    keep top 5 of vision[{index}] by attention(last -> vision)")
    policyc.compile(model, policy)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1]:], expected_tokens)
    image_tokens = inputs["input_ids"] == IMAGE_TOKEN_ID
    for row in range(batch):
        kept = model.policyc.kept_positions[row]
        kept_candidates = kept[candidates[row, kept]]
        assert torch.equal(kept_candidates, expected_kept[row])
        assert int(image_tokens[row, kept].sum()) == int(image_tokens[row].sum()) - (sizes[0] - 5)


@pytest.mark.parametrize("family", sorted(ALL_FAMILIES))
def test_dropping_from_one_image_in_the_llm_batches_equal_single_runs(family: str) -> None:
    """Every image but the second keeps all its tokens; the second keeps half (a padded batch, each row alone)."""
    model, inputs, vision_ids, sizes = ALL_FAMILIES[family](2, 1)
    policy = _policy("llm.layer[1]", "    drop vision[1] - (top 50% of vision[1] by attention(last -> vision))")
    policyc.compile(model, policy)
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    kept = kept_vision(model, inputs, vision_ids)  # fillers of rows keeping fewer tokens left out
    model.policyc.remove()
    for row, images in enumerate(_image_spans(inputs, vision_ids, sizes)):
        for index, positions in enumerate(images):
            survivors = int(torch.isin(positions, kept[row]).sum())
            assert survivors == (len(positions) // 2 if index == 1 else len(positions))
    assert_batch_equals_single_runs(model, policy, {}, inputs, SINGLE[family], drops=True)


@pytest.mark.parametrize(("weigh", "budget", "batch"), [("equal", "20", 1), ("attention(last -> vision)", "40%", 2)])
def test_a_budget_split_across_images_in_the_llm_equals_the_reference(weigh: str, budget: str, batch: int) -> None:
    """`keep top(allocate=S) K of vision by attention(last -> vision)` at layer 1: each prompt's budget split across
    its images (equally, or by their summed attention: tests/reference/multi_image.py's split), each image's share
    its tokens the last prompt token attends to most (FastV's ranking, tests/reference/fastv.py)."""
    model, inputs, _, sizes = FAMILIES["llava"](batch, 2)
    spans = _image_spans(inputs, [IMAGE_TOKEN_ID], sizes)

    def pick(row: int, scores: torch.Tensor) -> torch.Tensor:
        images = spans[row]
        total = sum(len(p) for p in images)
        count = total * 40 // 100 if budget.endswith("%") else int(budget)
        weights = [1.0 if weigh == "equal" else float(scores[p].double().sum()) for p in images]
        shares = split_budget(count, weights, [len(p) for p in images])
        return torch.cat([p[ref_top(scores[p], c)] for p, c in zip(images, shares, strict=True)]).sort().values

    expected_tokens, expected_kept = fastv_generate(model, inputs["input_ids"], inputs["attention_mask"],
                                                    inputs["pixel_values"], layer=1, keep=0, max_new_tokens=4,
                                                    pick=pick)
    policy = _policy("llm.layer[1]", f"    keep top(allocate={weigh}) {budget} of vision by attention(last -> vision)")
    policyc.compile(model, policy)
    tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(tokens[:, inputs["input_ids"].shape[1]:], expected_tokens)
    for row in range(batch):
        kept = model.policyc.kept_positions[row]
        assert torch.equal(kept[inputs["input_ids"][row, kept] == IMAGE_TOKEN_ID], expected_kept[row])
    model.policyc.remove()
    if batch > 1:
        assert_batch_equals_single_runs(model, policy, {}, inputs, SINGLE["llava"], drops=True)


def test_image_where_equals_the_indexed_set() -> None:
    """`vision where image > 0` and `vision - vision[0]` are the same set: the same kept tokens."""
    model, inputs, _, _ = FAMILIES["qwen2_vl"](2, 3)
    kept = []
    for target in ("vision where image > 0", "vision - vision[0]"):
        policyc.compile(model, _policy("llm.layer[1]", f"    drop top 60% of {target} by attention(last -> vision)"))
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        kept.append(model.policyc.kept_positions)
        model.policyc.remove()
    assert torch.equal(kept[0], kept[1])


def test_an_image_a_prompt_lacks_fails_loudly() -> None:
    """`keep ... of vision[3]` on prompts of three images would drop every image token: it fails at its line."""
    model, inputs, _, _ = FAMILIES["llava"](1, 0)
    policyc.compile(model, _policy("llm.layer[1]", "    keep top 4 of vision[3] by attention(last -> vision)"))
    with pytest.raises(PolicyError) as error:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    message = str(error.value)
    assert "vision[3] is image 3 of each prompt, but prompt 0 of this batch holds 3 image(s)" in message
    assert "one_image.tokpol:3:" in message


# ---------------------------------------------------------------- before the LLM

def _thin_one(image: int, percent: int):
    """The reference: image `image` of each row keeps its `percent`% most isolated tokens, the others all."""
    def choose(row: int):
        def pick(images: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for index, features in enumerate(images):
                keep = torch.ones(features.shape[0], dtype=torch.bool)
                if index == image % len(images):
                    keep[:] = False
                    keep[top_indices(isolation(features), features.shape[0] * percent // 100)] = True
                out.append((keep, features))
            return out
        return pick
    return choose


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(("index", "batch"), [("1", 1), ("-1", 2)])
def test_thinning_one_image_at_the_projector_equals_the_reference(family: str, index: str, batch: int) -> None:
    model, inputs, vision_ids, sizes = FAMILIES[family](batch, 6)
    policy = _policy("projector.output", f"    protect vision - vision[{index}]\n"
                                         f"    keep top 50% of vision[{index}] by diversity(features=hidden)")
    assert_equals_reference(model, inputs, vision_ids, sizes, _thin_one(int(index), 50), policy, {})


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "llava", "gemma3", "llava_next", "llava_onevision"])
def test_thinning_one_image_at_the_projector_batches_equal_single_runs(family: str) -> None:
    model, inputs, _, _ = ALL_FAMILIES[family](2, 8)
    policy = _policy("projector.output", "    drop vision where image == 1")
    assert_batch_equals_single_runs(model, policy, {}, inputs, SINGLE[family], drops=True)


@pytest.mark.parametrize("batch", [1, 2])
def test_dropping_later_frames_of_every_video_equals_the_reference(batch: int) -> None:
    """`drop vision where frame >= 2`: each Qwen2-VL video keeps its first two frame groups."""
    model = tiny_qwen2_vl(seed=batch)
    inputs = make_video_inputs(batch=batch, videos=VIDEOS, pad_left=2, seed=batch)
    grids = inputs["video_grid_thw"]
    sizes = [int(t * h * w) // QWEN_MERGE**2 for t, h, w in grids]

    def choose(row: int):
        def pick(videos: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            out = []
            for features, (t, _, _) in zip(videos, grids[2 * row:2 * row + 2].tolist(), strict=True):
                per_frame = features.shape[0] // t
                out.append((torch.arange(features.shape[0]) < 2 * per_frame, features))
            return out
        return pick

    policy = _policy("projector.output", "    drop vision where frame >= 2")
    kept = assert_equals_reference(model, inputs, [QWEN_VIDEO_ID], sizes, choose, policy, {})
    assert [k.numel() for k in kept] == [2 * 16 + 2 * 8] * batch


def test_frames_and_images_are_checked_where_they_are_known() -> None:
    with pytest.raises(PolicyError) as error:
        _policy("llm.layer[1]", "    drop vision where frame > 0")
    assert "frame" in str(error.value)
    policy = _policy("encoder.layer[1]", "    keep top 50% of vision[0] by key_norm")
    with pytest.raises(PolicyError) as error:
        policyc.compile(FAMILIES["llava"](1, 0)[0], policy)
    assert "one image of a prompt is picked at projector.output or in the LLM" in str(error.value)


ONE_IMAGE_BODIES = ["    protect vision - vision[1]\n    keep top 5 of vision[1] by attention(last -> vision)",
                    "    keep top(allocate=equal) 20 of vision by attention(last -> vision)"]


@pytest.mark.parametrize("body", ONE_IMAGE_BODIES)
def test_the_graph_backend_equals_eager_on_one_image(body: str) -> None:
    model, inputs, _, _ = FAMILIES["llava"](1, 2)
    runs = []
    for backend in ("eager", "fx"):
        policyc.compile(model, _policy("llm.layer[1]", body), backend=backend)
        runs.append((model.generate(**inputs, max_new_tokens=4, do_sample=False), model.policyc.kept_positions))
        model.policyc.remove()
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][1].shape[1] < inputs["input_ids"].shape[1]


def test_onevision_numbers_a_video_and_its_images_in_prompt_order_in_the_llm_and_refuses_before_it() -> None:
    """A OneVision prompt with a video (placed before its images) and two images: in the LLM they are images 0, 1
    and 2 in prompt order, and `vision[0]` thins the video alone; before the LLM images and videos are encoded in
    two forwards that cannot number them together, so a projector stage asking fails loudly."""
    model = tiny_anyres("llava_onevision", seed=3)
    inputs = make_anyres_inputs(model, [[(30, 64), (20, 20)]], (3,), seed=3)
    order = adapt(model).image_index(inputs["input_ids"])[0]
    video = (inputs["input_ids"][0] == ANYRES_VIDEO_ID).nonzero().flatten()
    assert set(order[video].tolist()) == {0} and order.amax() == 2
    policyc.compile(model, _policy("llm.layer[1]", "    drop vision[0] - (top 50% of vision[0] by attention(last -> "
                                                   "vision))"))
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    kept = model.policyc.kept_positions[0]
    model.policyc.remove()
    assert int(torch.isin(video, kept).sum()) == len(video) // 2
    assert bool(torch.isin((order > 0).nonzero().flatten(), kept).all())
    policyc.compile(model, _policy("projector.output", "    drop vision where image == 1"))
    with pytest.raises(PolicyError, match="a prompt holds images and videos, which this model encodes in two"):
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    model.policyc.remove()


def test_dropping_later_frames_of_a_onevision_video() -> None:
    """`drop vision where frame >= 2` on OneVision videos of 3 frames: each keeps its first two frames' pooled tokens
    and its newline; a padded batch equals single runs."""
    model = tiny_anyres("llava_onevision", seed=5)
    inputs = make_anyres_inputs(model, [[(30, 64)], [(20, 20)]], (3, 3), pad_left=2, seed=5)
    policy = _policy("projector.output", "    drop vision where frame >= 2")
    policyc.compile(model, policy)
    model.generate(**inputs, max_new_tokens=1, do_sample=False)
    kept = kept_vision(model, inputs, [ANYRES_VIDEO_ID])
    model.policyc.remove()
    for row in range(2):
        video = int((inputs["input_ids"][row] == ANYRES_VIDEO_ID).sum())
        assert kept[row].numel() == 2 * (video - 1) // 3 + 1
    assert_batch_equals_single_runs(model, policy, {}, inputs, single_anyres, drops=True)
