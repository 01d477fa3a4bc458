"""VisionDrop (Xu et al., "VisionDrop: training-free visual token pruning with visual-only scoring",
arXiv:2506.22283; Ruixxxx/VisionDrop), written plainly from algorithms.md §5; shares no code with policyc.

Exact semantics of this reference, one sample at a time, eager attention, fp32:
- Optionally VisionZip's encoder stage first (tests/reference/visionzip.py): the LLM sees only the kept image
  tokens, numbered contiguously.
- After decoder layer k of each stage (k, d, c): the layer's output h goes through layer k+1's input norm,
  q/k projections and RoPE (at the current rows' positions). For the image rows as queries,
  P = softmax(Q_img Kᵀ · scaling + causal and padding mask) [H, Nv, n]; score = P.mean(heads)[:, image
  columns].mean(image queries) [Nv].
- dominant: the d highest scores (stable sort, ties to the earlier row); rest: the other image rows in sequence
  order; targets = rest[arange(0, |rest|, max(1, |rest| // c))][:c]; every other row of rest goes to the target
  whose head-mean post-RoPE key (the same recomputation) is most cosine-similar (the earlier target on ties),
  and h[target] becomes h[target] + mean(h[assigned]).
- The sequence keeps the text, the dominant rows and the targets, in their order (VisionDrop's code moves the
  contextual tokens after the dominant ones; policyc keeps every token in its place, and so does this
  reference); later layers number the real rows 0..n-1 (padding 0), a generated token t gets n + t.
- Greedy decoding WITHOUT a KV cache: every step reruns all layers on prompt + generated tokens and applies the
  prefill's kept rows and merges (the prompt rows are causal, so they are the prefill's).
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastv import eager_copy, position_ids, prompt_embeddings, run_layers, top_indices
from reference.visionzip import visionzip_image_features


def _rotate(t: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin


def next_layer_qk(model: LlavaForConditionalGeneration, layer: int, hidden: Tensor,
                  positions: Tensor) -> tuple[Tensor, Tensor, float]:
    """Layer `layer + 1`'s post-RoPE queries [H, n, d] and keys [Hkv, n, d] of hidden [1, n, D]."""
    lm = model.model.language_model
    attn = lm.layers[layer + 1].self_attn
    x = lm.layers[layer + 1].input_layernorm(hidden)[0]
    n = x.shape[0]
    q = attn.q_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, attn.head_dim).transpose(0, 1)
    cos, sin = lm.rotary_emb(hidden, position_ids=positions[None])
    return _rotate(q, cos[0], sin[0]), _rotate(k, cos[0], sin[0]), float(attn.scaling)


def visiondrop_stage(model: LlavaForConditionalGeneration, layer: int, hidden: Tensor, positions: Tensor,
                     valid: Tensor, image: Tensor, dominant: int, contextual: int,
                     ) -> tuple[list[int], dict[int, list[int]]]:
    """One stage on the current rows: the rows kept (ascending) and {target row: rows merged into it}."""
    q, k, scaling = next_layer_qk(model, layer, hidden, positions)
    n = hidden.shape[1]
    img = image.nonzero().flatten().tolist()
    if not img:
        return list(range(n)), {}
    keys = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = torch.einsum("hqd,hkd->hqk", q[:, img], keys) * scaling  # [H, Nv, n]
    rows = torch.tensor(img)
    visible = (torch.arange(n)[None, :] <= rows[:, None]) & valid[None, :]
    probabilities = torch.softmax(logits.masked_fill(~visible[None], float("-inf")), dim=-1)
    score = probabilities.mean(0)[:, img].mean(0)  # [Nv]
    dominant_local = top_indices(score, min(dominant, len(img))).tolist()
    rest = [img[i] for i in range(len(img)) if i not in dominant_local]
    groups: dict[int, list[int]] = {}
    if rest and contextual > 0:
        targets = rest[:: max(1, len(rest) // contextual)][:contextual]
        metric = k.mean(0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        groups = {t: [] for t in targets}
        for r in rest:
            if r not in groups:
                similarity = torch.stack([metric[r] @ metric[t] for t in targets])
                groups[targets[int(similarity.argmax())]].append(r)
    kept = sorted([i for i in range(n) if not bool(image[i])] + [img[i] for i in dominant_local] + list(groups))
    return kept, groups


def _merge(hidden: Tensor, groups: dict[int, list[int]]) -> Tensor:
    hidden = hidden.clone()
    for target, assigned in groups.items():
        if assigned:
            hidden[0, target] = hidden[0, target] + hidden[0, assigned].mean(0)
    return hidden


def _row(model: LlavaForConditionalGeneration, embeds: Tensor, valid: Tensor, image: Tensor,
         stages: list[tuple[int, int, int]], max_new_tokens: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    lm = model.model.language_model
    length = embeds.shape[0]
    rows = torch.arange(length)  # prompt rows of the current sequence
    hidden, positions, start = embeds[None], position_ids(valid), 0
    plan: list[tuple[Tensor, dict[int, list[int]]]] = []  # per stage: rows kept, merges (prompt rows)
    for layer, dominant, contextual in stages:
        hidden, _ = run_layers(model, range(start, layer + 1), hidden, positions, valid[rows])
        keep, groups = visiondrop_stage(model, layer, hidden, positions, valid[rows], image[rows], dominant,
                                        contextual)
        hidden = _merge(hidden, groups)[:, keep]
        plan.append((rows[keep], {int(rows[t]): rows[a].tolist() for t, a in groups.items()}))
        rows = rows[keep]
        positions, start = position_ids(valid[rows]), layer + 1
    generated: list[int] = []
    logits: list[Tensor] = []
    for t in range(max_new_tokens):
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long))
        hidden = torch.cat([embeds, new.to(embeds.dtype)])[None]
        full_valid = torch.cat([valid, torch.ones(t, dtype=torch.bool)])
        tail = torch.arange(length, length + t)
        rows = torch.arange(length + t)
        positions = torch.cat([position_ids(valid), int(valid.sum()) + torch.arange(t)])
        start = 0
        for (layer, _, _), (kept, groups) in zip(stages, plan, strict=True):
            hidden, _ = run_layers(model, range(start, layer + 1), hidden, positions, full_valid[rows])
            local = {int(torch.searchsorted(rows, target)): torch.searchsorted(rows, torch.tensor(assigned)).tolist()
                     for target, assigned in groups.items()}
            select = torch.cat([kept, tail])
            hidden = _merge(hidden, local)[:, torch.searchsorted(rows, select)]
            rows = select
            real = valid[kept]
            positions = torch.cat([position_ids(real), int(real.sum()) + torch.arange(t)])
            start = layer + 1
        hidden, _ = run_layers(model, range(start, len(lm.layers)), hidden, positions, full_valid[rows])
        logits.append(model.lm_head(lm.norm(hidden[0, -1])))
        generated.append(int(logits[-1].argmax()))
    return torch.tensor(generated, dtype=torch.long), [kept for kept, _ in plan], logits


@torch.no_grad()
def visiondrop_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                        pixel_values: Tensor, *, stages: list[tuple[int, int, int]], max_new_tokens: int,
                        encoder: tuple[int, int] | None = None) -> tuple[Tensor, list[list[Tensor]], Tensor]:
    """Greedy VisionDrop. stages: (decoder layer k, dominant d, contextual c) per stage; encoder: VisionZip's
    (dominant, contextual) before the LLM, or None. Returns the new tokens [B, T], per row the original prompt
    positions kept after each stage (ascending), and the logits of every step [B, T, V]."""
    ref = eager_copy(model)
    embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    image = input_ids == ref.config.image_token_id
    keep = torch.ones_like(image)
    if encoder is not None:
        features, filled = visionzip_image_features(ref, pixel_values, *encoder)
        per_row = image.sum(1)
        features = features.reshape(-1, features.shape[-1]).split(per_row.tolist())
        filled = filled.flatten().split(per_row.tolist())
        embeds = embeds.clone()
        for b in range(input_ids.shape[0]):
            embeds[b, image[b]] = features[b].to(embeds.dtype)
            keep[b, image[b]] = filled[b]
    tokens, kept, logits = [], [], []
    for b in range(input_ids.shape[0]):
        original = keep[b].nonzero().flatten()
        row = _row(ref, embeds[b, original], attention_mask[b, original].bool(), image[b, original], stages,
                   max_new_tokens)
        tokens.append(row[0])
        kept.append([original[rows] for rows in row[1]])
        logits.append(torch.stack(row[2]))
    return torch.stack(tokens), kept, torch.stack(logits)


__all__ = ["visiondrop_generate", "visiondrop_stage"]
