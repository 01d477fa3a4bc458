"""Token dropping on Qwen3-VL (M-RoPE and DeepStack), written plainly; shares no code with policyc.

- DeepStack (Meng et al., "DeepStack: Deeply Stacking Visual Tokens is Surprisingly Simple and Effective for
  LMMs", arXiv:2406.04334), as Qwen3-VL uses it: the vision tower gives, besides each image's merged tokens, one
  feature per token and level k (mergers after some vision blocks); level k's feature of a visual token is added to
  that token's hidden state after LLM decoder layer k. A dropped token's features are gone with it: only the rows
  the LLM still holds receive theirs.
- FastV (Chen et al., arXiv:2403.06764), as its released code does it: after decoder layer `layer`, every image
  token is scored by the attention the LAST prompt token pays it (post-softmax probabilities of that layer, mean
  over heads); the top `keep` image tokens and every text token go on, at their ORIGINAL positions.
- Dropping before the LLM (`projector_deepstack_generate`): a selection function picks, per image, tokens of its
  merged features; the LLM sees the text and the kept image tokens only (with their DeepStack features), each at
  its ORIGINAL position.

M-RoPE positions: `reference.fastv_mrope.mrope_positions` (Qwen2-VL's scheme, which Qwen3-VL keeps for images; the
test checks them against the model's `get_rope_index`). Decoding: greedy, NO KV cache, one unpadded row at a time;
every step reruns the whole sequence (prompt rows as the prefill kept them, plus the generated tokens, which have
no DeepStack features). Exactly max_new_tokens tokens per row.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from reference.fastv_mrope import mrope_positions

Item = tuple[int, tuple[int, int], Tensor, list[Tensor]]  # an image or video: frame groups, (h, w), features, DeepStack


def _eager(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def _layer(model: nn.Module, i: int, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Decoder layer `i` on one causal sequence hidden [1, n, D] at M-RoPE positions [3, n]: its output and its
    attention probabilities [1, H, n, n]."""
    lm = model.model.language_model
    n = hidden.shape[1]
    mask = torch.zeros(n, n, dtype=hidden.dtype).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(),
                                                              torch.finfo(hidden.dtype).min)[None, None]
    seen: list[Tensor] = []
    handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
    try:
        rotary = lm.rotary_emb(hidden, positions[:, None])
        hidden = lm.layers[i](hidden, attention_mask=mask, position_embeddings=rotary)
    finally:
        handle.remove()
    return hidden, seen[-1]


def _logits_last(model: nn.Module, hidden: Tensor) -> int:
    return int(model.lm_head(model.model.language_model.norm(hidden[0, -1])).argmax())


class _Row:
    """One prompt row without its padding: embeddings [L, D] with each image's and video's features written over
    its placeholders, the visual mask [L] (image and video tokens), M-RoPE positions [3, L], DeepStack features per
    level [L, D] (zero off visual tokens), and each image's or video's merged features [n_i, D] in prompt order.
    `items`: per image or video in prompt order (features [n, D], DeepStack features [k][n, D])."""

    def __init__(self, model: nn.Module, row: Tensor, items: list[Item]) -> None:
        config = model.config
        self.image = (row == config.image_token_id) | (row == config.video_token_id)
        self.embeds = model.get_input_embeddings()(row).clone()
        self.embeds[self.image] = torch.cat([features for _, _, features, _ in items])
        self.levels = []
        for k in range(len(items[0][3]) if items else 0):
            full = torch.zeros_like(self.embeds)
            full[self.image] = torch.cat([levels[k] for _, _, _, levels in items])
            self.levels.append(full)
        # a video's frame groups are runs of their own (timestamps between), each placed as a one-frame image
        grids = [grid for frames, grid, _, _ in items for _ in range(frames)]
        visual_as_image = torch.where(self.image, config.image_token_id, row)
        self.positions = mrope_positions(visual_as_image, config.image_token_id, grids,
                                         config.vision_config.spatial_merge_size)
        self.features = [features for _, _, features, _ in items]

    def run(self, model: nn.Module, rows: Tensor, generated: list[int], upto: int | None = None,
            keep_after: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Layers on the prompt rows `rows` plus `generated`; after layer `upto`, `keep_after(probs)` names the prompt
        rows (indices into `rows`) that go on. Returns the last hidden states [1, n, D] and the rows kept."""
        lm = model.model.language_model
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
        t = len(generated)
        top = int(self.positions.max())
        hidden = torch.cat([self.embeds[rows], new])[None]
        where = torch.cat([self.positions[:, rows], (top + 1 + torch.arange(t))[None].expand(3, -1)], dim=1)
        for i in range(len(lm.layers)):
            hidden, probs = _layer(model, i, hidden, where)
            if i == upto and keep_after is not None:
                chosen = torch.cat([keep_after(probs[:, :, : len(rows), : len(rows)]),
                                    torch.arange(len(rows), len(rows) + t)])
                rows, hidden, where = rows[chosen[: -t or None]], hidden[:, chosen], where[:, chosen]
            if i < len(self.levels):  # DeepStack: level i's features of the visual rows still here
                hidden = hidden + torch.cat([self.levels[i][rows], torch.zeros_like(new)])[None]
        return hidden, rows


def _encode(model: nn.Module, pixels: Tensor | None, grids: Tensor | None) -> list[Item]:
    """Per image or video of `grids` ([N, 3] t, h, w): (t, (h, w), merged features [n, D], DeepStack [k][n, D])."""
    if pixels is None or grids is None:
        return []
    out = model.model.get_image_features(pixels, grids, return_dict=True)
    features = list(out.pooler_output)
    sizes = [f.shape[0] for f in features]  # each level: per image (transformers 5.25), or packed (5.17)
    levels = [list(torch.split(level, sizes) if isinstance(level, Tensor) else level)
              for level in out.deepstack_features]
    return [(int(t), (int(h), int(w)), features[i], [level[i] for level in levels])
            for i, (t, h, w) in enumerate(grids.tolist())]


def _rows(model: nn.Module, inputs: dict[str, Tensor]) -> Iterator[tuple[int, _Row]]:
    """Per prompt row: its padding count and its `_Row` (its images and videos in prompt order; every row holds as
    many videos)."""
    config = model.config
    images = iter(_encode(model, inputs.get("pixel_values"), inputs.get("image_grid_thw")))
    videos = _encode(model, inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"))
    per_row = len(videos) // inputs["input_ids"].shape[0]
    for b, (ids, valid) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True)):
        row = ids[valid]
        mine = iter(videos[b * per_row:(b + 1) * per_row])
        items, frames_left = [], 0
        starts = torch.diff(row, prepend=torch.tensor([-1])) != 0
        for token in row[starts].tolist():  # one entry per run of equal ids, in order
            if token == config.image_token_id:
                items.append(next(images))
            elif token == config.video_token_id:
                if frames_left == 0:
                    items.append(next(mine))
                    frames_left = items[-1][0]
                frames_left -= 1
        yield int((~valid).sum()), _Row(model, row, items)


@torch.no_grad()
def fastv_deepstack_generate(model: nn.Module, inputs: dict[str, Tensor], *, layer: int, keep: int,
                             max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy FastV generation on a Qwen3-VL model for a (left-padded) batch of `inputs` as its processor gives
    them (images and videos: every visual token is a candidate). Returns the new tokens [B, max_new_tokens] and, per
    row, the kept visual-token indices into that row of `input_ids` (padding included), ascending."""
    ref = _eager(model)
    tokens, kept_rows = [], []
    for pad, row in _rows(ref, inputs):
        image_idx = row.image.nonzero().flatten()

        def fastv(probs: Tensor, image_idx: Tensor = image_idx, image: Tensor = row.image) -> Tensor:
            scores = probs[0].mean(0)[-1]
            order = torch.sort(scores[image_idx], descending=True, stable=True).indices[:keep]
            return torch.sort(torch.cat([(~image).nonzero().flatten(), image_idx[order]])).values

        everything = torch.arange(row.image.shape[0])
        generated: list[int] = []
        kept = everything
        for _ in range(max_new_tokens):
            hidden, kept = row.run(ref, everything, generated, layer, fastv)
            generated.append(_logits_last(ref, hidden))
        tokens.append(generated)
        kept_rows.append(kept[row.image[kept]] + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows


@torch.no_grad()
def projector_deepstack_generate(model: nn.Module, inputs: dict[str, Tensor], select: Callable[[Tensor], Tensor],
                                 *, max_new_tokens: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy generation where `select(features [n, D]) -> [n] bool` keeps, per image or video (all its frames),
    some of its merged tokens before the LLM. Returns the new tokens [B, max_new_tokens] and, per row, the kept
    visual-token indices into that row of `input_ids` (padding included), ascending."""
    ref = _eager(model)
    tokens, kept_rows = [], []
    for pad, row in _rows(ref, inputs):
        chosen = torch.cat([select(f) for f in row.features])
        kept = row.image.nonzero().flatten()[chosen]
        rows = torch.sort(torch.cat([(~row.image).nonzero().flatten(), kept])).values
        generated: list[int] = []
        for _ in range(max_new_tokens):
            generated.append(_logits_last(ref, row.run(ref, rows, generated)[0]))
        tokens.append(generated)
        kept_rows.append(kept + pad)
    return torch.tensor(tokens, dtype=torch.long), kept_rows
