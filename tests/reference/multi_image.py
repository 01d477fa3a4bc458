"""Budgets split across a prompt's images (GlobalCom2 arXiv:2501.05179, HiRED arXiv:2408.10945) and temporal
merging across video frames (HoliTom arXiv:2505.21334, DyCoke arXiv:2411.15024), before the LLM, written plainly
with loops; shares no code with policyc.

- `split_budget(K, weights, sizes)`: each image's share of K is proportional to its weight, capped at its size,
  the capped images' excess split again over the others (repeat until nothing exceeds); whole counts by largest
  remainder (floors, then one more token each to the largest fractional parts, ties to the earlier image).
  Weights below zero count as zero; all zero: equal weights.
- `isolation(features)`: per token, 1 - the cosine similarity to its most similar other token of the same image
  (1 for an image of one token).
- `temporal_merge(features, frames, threshold)`: token (f, s) joins the run of (f-1, s) when the cosine
  similarity of their own features is above `threshold`; a run becomes the mean of its members, kept in its
  first frame's token, the others dropped.
- Generation: the unmodified model's LLM inputs (embeddings with the image/video features written in, and the
  model's own position ids: M-RoPE on Qwen2-VL, 0..L-1 elsewhere) are captured once; per row without padding the
  dropped vision rows are removed and merged rows replaced; greedy decoding without a cache recomputes every layer
  on the kept prompt plus the generated tokens (Qwen2-VL: generated token t at (max + 1 + t) x 3).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

# per row: each image's features [n_i, D] -> each image's (kept mask [n_i], features [n_i, D] after merging)
RowChoice = Callable[[list[Tensor]], list[tuple[Tensor, Tensor]]]


def split_budget(budget: int, weights: list[float], sizes: list[int]) -> list[int]:
    budget = max(0, min(budget, sum(sizes)))
    weights = [w if w > 0 else 0.0 for w in weights]
    if sum(w for w, n in zip(weights, sizes, strict=True) if n > 0) == 0:
        weights = [1.0 for _ in sizes]
    shares = [0.0 for _ in sizes]
    capped = [n == 0 for n in sizes]
    while True:
        left = budget - sum(shares[i] for i in range(len(sizes)) if capped[i])
        open_ = [i for i in range(len(sizes)) if not capped[i]]
        if not open_:
            break
        total = sum(weights[i] for i in open_)
        if total == 0:
            for i in open_:
                weights[i] = 1.0
            total = float(len(open_))
        over = False
        for i in open_:
            share = left * weights[i] / total
            if share >= sizes[i]:
                shares[i], capped[i], over = float(sizes[i]), True, True
        if not over:
            for i in open_:
                shares[i] = left * weights[i] / total
            break
    counts = [min(sizes[i], math.floor(shares[i])) for i in range(len(sizes))]
    fractions = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - math.floor(shares[i])), i))
    for i in fractions[: budget - sum(counts)]:
        counts[i] += 1
    return counts


def isolation(features: Tensor) -> Tensor:
    n = features.shape[0]
    unit = features.double() / features.double().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    out = torch.ones(n, dtype=torch.float64)
    for i in range(n):
        best = None
        for j in range(n):
            if j != i:
                similarity = float(unit[i] @ unit[j])
                best = similarity if best is None or similarity > best else best
        if best is not None:
            out[i] = 1 - best
    return out


def top_indices(score: Tensor, count: int) -> list[int]:
    """The `count` highest scores, ties to the earlier token."""
    order = sorted(range(score.shape[0]), key=lambda i: (-float(score[i]), i))
    return sorted(order[:count])


def allocate_choice(amount: int | float, weigh: str = "isolation") -> RowChoice:
    """Keep per row `amount` (a count, or a percentage as float of the row's image tokens, truncated) image tokens,
    split across the row's images by the sum of isolation (or equally), each image's by its highest isolation."""
    def choose(images: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        sizes = [f.shape[0] for f in images]
        total = sum(sizes)
        budget = amount if isinstance(amount, int) else int(total * amount / 100)
        scores = [isolation(f) for f in images]
        weights = [float(s.sum()) if weigh == "isolation" else 1.0 for s in scores]
        counts = split_budget(budget, weights, sizes)
        out = []
        for features, score, count in zip(images, scores, counts, strict=True):
            keep = torch.zeros(features.shape[0], dtype=torch.bool)
            keep[top_indices(score, count)] = True
            out.append((keep, features))
        return out
    return choose


def temporal_merge(features: Tensor, frames: int, threshold: float) -> tuple[Tensor, Tensor]:
    """One video's tokens [frames * S, D], frame after frame: (kept [frames * S] bool, merged features)."""
    spots = features.shape[0] // frames
    root = list(range(features.shape[0]))
    for f in range(1, frames):
        for s in range(spots):
            now, before = f * spots + s, (f - 1) * spots + s
            a, b = features[now].double(), features[before].double()
            cosine = float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-12)
            if cosine > threshold:
                root[now] = root[before]
    merged = features.clone()
    kept = torch.zeros(features.shape[0], dtype=torch.bool)
    for r in set(root):
        members = [i for i in range(len(root)) if root[i] == r]
        merged[r] = features[members].double().mean(0).to(features.dtype)
        kept[r] = True
    return kept, merged


def temporal_choice(frames: list[int], threshold: float) -> RowChoice:
    """Temporal merging of each video of the row (`frames[i]`: frame groups of the row's i-th video)."""
    def choose(videos: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        return [temporal_merge(v, t, threshold) for v, t in zip(videos, frames[: len(videos)], strict=True)]
    return choose


def _llm_inputs(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """The embeddings [B, L, D] and position ids (M-RoPE: [3, B, L]; None: 1-D) the unmodified LLM receives."""
    decoder = model.get_decoder()
    seen: list[dict] = []
    handle = decoder.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    positions = seen[0].get("position_ids")
    return seen[0]["inputs_embeds"], positions if positions is not None and positions.dim() == 3 else None


@torch.no_grad()
def generate(model: nn.Module, inputs: dict[str, Tensor], vision_ids: list[int], sizes: list[int],
             choose: Callable[[int], RowChoice], *, max_new_tokens: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy tokens [B, max_new_tokens], per row the kept vision-token indices into `input_ids` (padding
    included), and the first step's logits [B, V]. `sizes`: the tokens of each image/video/tile in prompt order
    over the whole batch; `choose(row)` decides for the images of that row."""
    embeds, positions = _llm_inputs(model, inputs)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cursor = 0
    generated_rows, kept_rows, first_logits = [], [], []
    for row, valid in enumerate(inputs["attention_mask"].bool()):
        ids, hidden = inputs["input_ids"][row], embeds[row].clone()
        vision = torch.zeros_like(valid)
        for token in vision_ids:
            vision |= ids == token
        vision &= valid
        index = vision.nonzero().flatten().tolist()
        row_sizes = []
        while sum(row_sizes) < len(index):
            row_sizes.append(sizes[cursor])
            cursor += 1
        parts, start = [], 0
        for n in row_sizes:
            parts.append(index[start:start + n])
            start += n
        keep = valid & ~vision
        for part, (kept, merged) in zip(parts, choose(row)([hidden[p] for p in parts]), strict=True):
            hidden[part] = merged
            keep[torch.tensor(part)[kept]] = True
        kept_rows.append((keep & vision).nonzero().flatten())
        prompt = hidden[keep]
        where = positions[:, row, keep] if positions is not None else torch.arange(int(keep.sum()))[None]
        top = int(where.max())
        tokens: list[int] = []
        for t in range(max_new_tokens):
            new = model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))
            sequence = torch.cat([prompt, new.to(prompt.dtype)])[None]
            if positions is not None:
                at = torch.cat([where, (top + 1 + torch.arange(t))[None].expand(3, -1)], 1)[:, None]
            else:
                at = torch.arange(sequence.shape[1])[None]
            out = decoder(inputs_embeds=sequence, position_ids=at, use_cache=False)
            logits = head(out.last_hidden_state[0, -1])
            first_logits += [logits] if t == 0 else []
            tokens.append(int(logits.argmax()))
        generated_rows.append(tokens)
    return torch.tensor(generated_rows, dtype=torch.long), kept_rows, torch.stack(first_logits)
