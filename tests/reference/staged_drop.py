"""Progressive image-token dropping at several LLM layers with contiguous re-numbering, as
PyramidDrop's code does it (Xing et al., arXiv:2410.17247; algorithms.md §3f); shares no code with policyc.

At each stage (after decoder layer k), the image tokens still present are ranked by the attention the
last prompt token pays them in layer k (post-softmax, mean over heads) and the top `count` stay.
With `compact`, every later layer numbers the surviving real tokens 0..n-1 (padding gets 0) and a
generated token t gets position n + t, n being the real prompt tokens that layer still sees; without
it, tokens keep their original positions. Greedy decoding WITHOUT a KV cache: every step recomputes
all layers, each segment on the rows it keeps; the kept sets come from the prefill only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.fastv import eager_copy, position_ids, prompt_embeddings, run_layers, top_indices


def next_layer_probs(model: LlavaForConditionalGeneration, layer: int, hidden: Tensor, positions: Tensor,
                      valid: Tensor) -> Tensor:
    """PyramidDrop's lightweight attention: the output of `layer` through layer `layer + 1`'s input norm,
    q/k projections and RoPE; returns the last row's probabilities per head, [H, n]."""
    lm = model.model.language_model
    attn = lm.layers[layer + 1].self_attn
    x = lm.layers[layer + 1].input_layernorm(hidden)[0]  # [n, D]
    n, head_dim = x.shape[0], attn.head_dim
    q = attn.q_proj(x).view(n, -1, head_dim).transpose(0, 1)  # [H, n, d]
    k = attn.k_proj(x).view(n, -1, head_dim).transpose(0, 1)  # [Hkv, n, d]
    cos, sin = lm.rotary_emb(hidden, position_ids=positions[None])
    cos, sin = cos[0], sin[0]

    def rotate(t: Tensor) -> Tensor:
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], dim=-1) * sin

    q, k = rotate(q), rotate(k).repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    logits = torch.einsum("hd,hnd->hn", q[:, -1], k) * attn.scaling
    logits = logits.masked_fill(~valid[None, :], float("-inf"))  # the last row sees every earlier key
    return torch.softmax(logits.float(), dim=-1)


def _row(model: LlavaForConditionalGeneration, embeds: Tensor, valid: Tensor, image: Tensor,
         stages: list[tuple[int, int]], compact: bool, max_new_tokens: int,
         next_layer: bool = False) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    lm = model.model.language_model
    length, device = embeds.shape[0], embeds.device
    bounds = [k for k, _ in stages]
    # Prefill: decide each stage's kept rows, segment by segment.
    rows = torch.arange(length, device=device)
    kept_per_stage: list[Tensor] = []
    hidden, start = embeds[None], 0
    positions = position_ids(valid)
    for layer, count in stages:
        hidden, probs = run_layers(model, range(start, layer + 1), hidden, positions, valid[rows])
        if next_layer:
            scores = next_layer_probs(model, layer, hidden, positions, valid[rows]).mean(dim=0)
        else:
            scores = probs[0].mean(dim=0)[-1]  # last row, over the current rows
        candidates = image[rows].nonzero().flatten()
        chosen = candidates[top_indices(scores[candidates], min(count, len(candidates)))]
        keep = torch.sort(torch.cat([(~image[rows]).nonzero().flatten(), chosen])).values
        rows, hidden = rows[keep], hidden[:, keep]
        positions = position_ids(valid[rows]) if compact else positions[keep]
        kept_per_stage.append(rows)
        start = layer + 1
    # Decoding: recompute everything each step.
    generated: list[int] = []
    logits: list[Tensor] = []
    for t in range(max_new_tokens):
        new = model.get_input_embeddings()(torch.tensor(generated, dtype=torch.long, device=device))
        hidden = torch.cat([embeds, new.to(embeds.dtype)])[None]
        tail = torch.arange(length, length + t, device=device)
        full_valid = torch.cat([valid, torch.ones(t, dtype=torch.bool, device=device)])
        rows = torch.arange(length + t, device=device)
        original = torch.cat([position_ids(valid), int(valid.sum()) + torch.arange(t, device=device)])
        positions, start = original, 0
        for stage_rows, end in zip([None, *kept_per_stage], [*bounds, len(lm.layers) - 1], strict=True):
            if stage_rows is not None:
                select = torch.cat([stage_rows, tail])
                hidden = hidden[:, torch.searchsorted(rows, select)]
                rows = select
                real = full_valid[stage_rows]
                positions = (torch.cat([position_ids(real), int(real.sum()) + torch.arange(t, device=device)])
                             if compact else original[select])
            hidden, _ = run_layers(model, range(start, end + 1), hidden, positions, full_valid[rows])
            start = end + 1
        logits.append(model.lm_head(lm.norm(hidden[0, -1])))
        generated.append(int(logits[-1].argmax()))
    return torch.tensor(generated, dtype=torch.long, device=device), kept_per_stage, logits


@torch.no_grad()
def staged_drop_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                         pixel_values: Tensor, *, stages: list[tuple[int, int]], compact: bool,
                         max_new_tokens: int, next_layer: bool = False,
                         with_logits: bool = False):  # type: ignore[no-untyped-def]
    """Tokens [B, T] and, per row, the prompt rows kept after each stage (ascending); with `with_logits`
    also the logits of every step, [B, T, V]. With `next_layer`, scores come from the next layer's
    projections of the stage layer's output (PyramidDrop)."""
    ref = eager_copy(model)
    embeds, _ = prompt_embeddings(ref, input_ids, pixel_values)
    image = input_ids == ref.config.image_token_id
    results = [_row(ref, embeds[b], attention_mask[b].bool(), image[b], stages, compact, max_new_tokens, next_layer)
               for b in range(input_ids.shape[0])]
    tokens, kept = torch.stack([r[0] for r in results]), [r[1] for r in results]
    if with_logits:
        return tokens, kept, torch.stack([torch.stack(r[2]) for r in results])
    return tokens, kept
