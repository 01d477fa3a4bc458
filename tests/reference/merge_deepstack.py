"""Token merging on Qwen3-VL (M-RoPE and DeepStack), written plainly, one prompt row at a time; shares no code with
policyc.

- DeepStack (arXiv:2406.04334), as Qwen3-VL uses it: the tower gives, besides each image's merged tokens, one
  feature per token and level k; level k's feature of a visual token is added to its hidden state after LLM
  decoder layer k. DeepStack merges no tokens; here a merged token's DeepStack feature at every level is the same
  combination of its members' features as its hidden state is of theirs (`fold=False`: the receiver keeps its own
  features only, what a merge that ignores DeepStack would do).
- `nearest_merge_generate`: VisionZip's contextual merge (arXiv:2412.04467) on each image's merged tokens before
  the LLM. The targets are every step-th token of the image, step = max(1, n // contextual), at most `contextual`
  of them; every other token goes to its most similar target (cosine of the tokens' features; ties to the earlier
  target); a target becomes itself plus the mean of the tokens that went to it. The merged token sits at the
  earliest position of its group (policyc's rule), at that position's M-RoPE position.
- `sparsevlm_generate`: SparseVLM v1.5 with recycling (arXiv:2410.04417), as in tests/reference/sparsevlm.py: raters
  once from the LLM's input embeddings; after each pruning layer the top budget image tokens by the attention the
  raters pay them (softmax over every key, mean over heads, then over raters) stay; of the dropped ones the
  floor(share n / 100) + 1 best are clustered by DPC-kNN (floor(m / 10) + 1 clusters and neighbours) on the layer's
  output, and each cluster's mean comes back in its centre's row. Kept rows keep their M-RoPE positions (policyc's
  rule on M-RoPE). A merge after layer k < 3 happens before level k's add.

Decoding: greedy, NO KV cache: every step reruns the whole row (the prompt's decisions do not depend on the
generated tokens, which sit after the prompt, at (m + 1 + t) x 3, m the prompt's largest coordinate, and have no
DeepStack features).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from reference.fastv_mrope import mrope_positions
from reference.sparsevlm import dpc_knn


@dataclass
class RowResult:
    """One prompt row's outcome; positions count the row's padding."""

    tokens: list[int]  # the greedy tokens
    rows: Tensor  # [n] the prompt positions that reach the last layer, ascending
    logits: Tensor  # [n, V] the prefill logits of those rows
    visual: Tensor  # [m] the visual positions among them (kept or merged tokens)


class _Prompt:
    """One unpadded prompt row: embeddings [L, D] with the image features written over the placeholders, the visual
    mask [L], M-RoPE positions [3, L], DeepStack features per level [L, D] (zero off visual tokens) and each image's
    token positions."""

    def __init__(self, model: nn.Module, ids: Tensor, images: list[tuple[Tensor, list[Tensor]]],
                 grids: list[tuple[int, int]]) -> None:
        config = model.config
        self.visual = ids == config.image_token_id
        self.embeds = model.get_input_embeddings()(ids).clone()
        self.levels = [torch.zeros_like(self.embeds) for _ in (images[0][1] if images else [])]
        where = self.visual.nonzero().flatten().tolist()
        self.images: list[list[int]] = []
        for features, levels in images:
            positions, where = where[:features.shape[0]], where[features.shape[0]:]
            self.images.append(positions)
            for i, p in enumerate(positions):
                self.embeds[p] = features[i]
                for k, level in enumerate(levels):
                    self.levels[k][p] = level[i]
        self.positions = mrope_positions(ids, config.image_token_id, grids, config.vision_config.spatial_merge_size)


def _layer(model: nn.Module, i: int, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Decoder layer `i` on one causal sequence [n, D] at M-RoPE positions [3, n]: its output [n, D] and attention
    probabilities [H, n, n]."""
    lm = model.model.language_model
    n = hidden.shape[0]
    mask = torch.zeros(n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), torch.finfo(hidden.dtype).min)
    seen: list[Tensor] = []
    handle = lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out: seen.append(out[1]))
    try:
        rotary = lm.rotary_emb(hidden[None], positions[:, None])
        out = lm.layers[i](hidden[None], attention_mask=mask[None, None], position_embeddings=rotary)
    finally:
        handle.remove()
    return out[0], seen[-1][0]


# After layer i: (layer output [n, D], attention [H, n, n], the prompt rows present [r], the DeepStack table) ->
# the rows that go on (indices into the present rows, ascending) and the new layer output
Step = Callable[[int, Tensor, Tensor, Tensor, list[Tensor]], tuple[Tensor, Tensor]]


def _run(model: nn.Module, prompt: _Prompt, embeds: Tensor, rows: Tensor, generated: list[int],
         after: Step | None = None) -> tuple[Tensor, Tensor]:
    """Every decoder layer on the prompt rows `rows` (of `embeds` [L, D]) then the generated tokens, DeepStack level
    k added after layer k to the rows present; `after` may drop and merge prompt rows after any layer (it edits the
    DeepStack table in place). Returns the last layer's output [n, D] and the prompt rows at the end."""
    lm = model.model.language_model
    new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
    t = len(generated)
    top = int(prompt.positions.max())
    levels = [level.clone() for level in prompt.levels]
    hidden = torch.cat([embeds[rows], new])
    for i in range(len(lm.layers)):
        where = torch.cat([prompt.positions[:, rows], (top + 1 + torch.arange(t))[None].expand(3, -1)], dim=1)
        hidden, probs = _layer(model, i, hidden, where)
        if after is not None:
            chosen, prompt_hidden = after(i, hidden[:len(rows)], probs[:, :len(rows), :len(rows)], rows, levels)
            hidden, rows = torch.cat([prompt_hidden[chosen], hidden[len(rows):]]), rows[chosen]
        if i < len(levels):
            hidden = hidden + torch.cat([levels[i][rows], torch.zeros_like(new)])
    return hidden, rows


def _logits(model: nn.Module, hidden: Tensor) -> Tensor:
    return model.lm_head(model.model.language_model.norm(hidden))


def _prompts(model: nn.Module, inputs: dict[str, Tensor]) -> list[tuple[int, _Prompt]]:
    """Per prompt row: its padding count and its `_Prompt` (images only, every row as many)."""
    grids = inputs["image_grid_thw"]
    out = model.model.get_image_features(inputs["pixel_values"], grids, return_dict=True)
    features = list(out.pooler_output)
    sizes = [f.shape[0] for f in features]
    levels = [list(torch.split(level, sizes) if isinstance(level, Tensor) else level)
              for level in out.deepstack_features]
    per_row = len(features) // inputs["input_ids"].shape[0]
    prompts = []
    for b, (ids, valid) in enumerate(zip(inputs["input_ids"], inputs["attention_mask"].bool(), strict=True)):
        mine = range(b * per_row, (b + 1) * per_row)
        images = [(features[i], [level[i] for level in levels]) for i in mine]
        grid = [(int(grids[i, 1]), int(grids[i, 2])) for i in mine]
        prompts.append((int((~valid).sum()), _Prompt(model, ids[valid], images, grid)))
    return prompts


def _eager(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def _generate(model: nn.Module, prompt: _Prompt, pad: int, embeds: Tensor, rows: Tensor, after: Step | None,
              max_new_tokens: int) -> RowResult:
    generated: list[int] = []
    hidden, kept = _run(model, prompt, embeds, rows, generated, after)
    logits = _logits(model, hidden)
    for _ in range(max_new_tokens):
        generated.append(int(_logits(model, hidden[-1]).argmax()))
        hidden, _ = _run(model, prompt, embeds, rows, generated, after)
    return RowResult(generated, kept + pad, logits, kept[prompt.visual[kept]] + pad)


@torch.no_grad()
def nearest_merge_generate(model: nn.Module, inputs: dict[str, Tensor], *, contextual: int, max_new_tokens: int,
                           fold: bool = True) -> list[RowResult]:
    """VisionZip's contextual merge of every image before the LLM (module docstring), per row of a left-padded
    batch of images."""
    ref = _eager(model)
    results = []
    for pad, prompt in _prompts(ref, inputs):
        embeds, levels = prompt.embeds.clone(), [level.clone() for level in prompt.levels]
        keep = ~prompt.visual
        unit = torch.nn.functional.normalize(prompt.embeds.float(), dim=-1)
        for positions in prompt.images:
            n = len(positions)
            step, count = max(1, n // contextual), min(contextual, n)
            targets = [positions[r] for r in range(n) if r % step == 0 and r // step < count]
            groups: dict[int, list[int]] = {t: [] for t in targets}
            for p in positions:
                if p not in groups:
                    similarity = [float(unit[p] @ unit[t]) for t in targets]
                    groups[targets[similarity.index(max(similarity))]].append(p)
            for target, members in groups.items():
                home = min([target, *members])
                keep[home] = True
                embeds[home] = prompt.embeds[target]
                for k, level in enumerate(levels):
                    level[home] = prompt.levels[k][target]
                if members:
                    embeds[home] += torch.stack([prompt.embeds[m] for m in members]).mean(0)
                    for k, level in enumerate(levels if fold else []):
                        level[home] += torch.stack([prompt.levels[k][m] for m in members]).mean(0)
        prompt.levels = levels
        results.append(_generate(ref, prompt, pad, embeds, keep.nonzero().flatten(), None, max_new_tokens))
    return results


def _raters(embeds: Tensor, visual: Tensor) -> Tensor:
    """The text positions after the first image whose relevance to the image, softmax(V Tᵀ over T).mean(over V),
    is above the mean."""
    positions = torch.arange(len(visual))
    text = positions[~visual & (positions > int(visual.nonzero()[0]))]
    relevance = torch.softmax(embeds[visual] @ embeds[text].T, dim=-1).mean(0)
    return text[relevance > relevance.mean()]


@torch.no_grad()
def sparsevlm_generate(model: nn.Module, inputs: dict[str, Tensor], *, pruning: list[int], budgets: list[int],
                       share: int, max_new_tokens: int, fold: bool = True) -> list[RowResult]:
    """SparseVLM with recycling (`share`: a whole percentage) on Qwen3-VL (module docstring), per row of a
    left-padded batch of images."""
    ref = _eager(model)
    results = []
    for pad, prompt in _prompts(ref, inputs):
        raters = _raters(prompt.embeds, prompt.visual)

        def sparsify(i: int, hidden: Tensor, probs: Tensor, rows: Tensor, levels: list[Tensor],
                     prompt: _Prompt = prompt, raters: Tensor = raters) -> tuple[Tensor, Tensor]:
            if i not in pruning:
                return torch.arange(len(rows)), hidden
            present = prompt.visual[rows].nonzero().flatten()
            relevance = probs.mean(0)[torch.isin(rows, raters)][:, present].mean(0)
            order = torch.sort(relevance, descending=True, stable=True).indices
            chosen = present[order[:min(budgets[pruning.index(i)], len(present))]]
            keep = ~prompt.visual[rows]
            keep[chosen] = True
            dropped = ~torch.isin(present, chosen)
            if dropped.any():
                n = int(dropped.sum())
                take = min(n, math.floor(n * share / 100) + 1)
                best = present[dropped][torch.sort(relevance[dropped], descending=True, stable=True).indices[:take]]
                count = min(take, math.floor(take / 10) + 1)
                centres, owner = dpc_knn(hidden[best].float(), count, count)
                merged = hidden.clone()
                for c in centres:
                    members = [j for j in range(take) if owner[j] == c]
                    merged[best[c]] = torch.stack([hidden[best[j]] for j in members]).mean(0)
                    keep[best[c]] = True
                    for level in levels if fold else []:  # the levels still to be added fold alike
                        level[rows[best[c]]] = torch.stack([level[rows[best[j]]] for j in members]).mean(0)
                hidden = merged
            return keep.nonzero().flatten(), hidden

        everything = torch.arange(len(prompt.visual))
        results.append(_generate(ref, prompt, pad, prompt.embeds, everything, sparsify, max_new_tokens))
    return results
