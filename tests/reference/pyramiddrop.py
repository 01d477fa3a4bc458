"""PyramidDrop (Xing et al., arXiv:2410.17247; Cooperx521/PyramidDrop `pdrop_forward`, algorithms.md §3);
shares no code with policyc.

After each layer of `layer_list` (0-based here: the code's 1-based [8, 16, 24] are 7, 15, 23) the image
tokens still present are ranked by the attention the last instruction token pays them, recomputed with
the NEXT layer's input norm, q/k projections and RoPE (softmax over all keys, mean over heads), and the
top `int(N0 * lam^(stage + 1))` stay, N0 being the image tokens of the prompt (counts relative to the
original, as the code's `int(cur_image_token * ratio_list[stage + 1])`). Positions are renumbered
contiguously after each drop and decode positions shift by the tokens dropped before each layer.
The staged mechanics are tests/reference/staged_drop.py's.
"""

from __future__ import annotations

from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.staged_drop import staged_drop_generate


def pyramiddrop_counts(n_image: int, lam: float, stages: int) -> list[int]:
    """Image tokens kept after each stage: int(N0 * lam^(i+1))."""
    return [int(n_image * lam ** (i + 1)) for i in range(stages)]


def pyramiddrop_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                         pixel_values: Tensor, *, layers: list[int], lam: float, max_new_tokens: int):  # type: ignore[no-untyped-def]
    """Greedy PyramidDrop decoding: tokens [B, T], per row the prompt rows kept after each stage, logits [B, T, V]."""
    n_image = int((input_ids[0] == model.config.image_token_id).sum())
    if not bool(((input_ids == model.config.image_token_id).sum(1) == n_image).all()):
        raise ValueError("every row must hold the same number of image tokens")
    stages = list(zip(layers, pyramiddrop_counts(n_image, lam, len(layers)), strict=True))
    return staged_drop_generate(model, input_ids, attention_mask, pixel_values, stages=stages, compact=True,
                                max_new_tokens=max_new_tokens, next_layer=True, with_logits=True)
