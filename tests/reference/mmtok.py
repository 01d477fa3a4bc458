"""MMTok (Dong et al., "MMTok: Multimodal Coverage Maximization for Efficient Inference of VLMs",
arXiv:2508.18264; Ironieser/MMTok), written plainly from the paper and its code; shares no code with policyc.

Per image, from the model's own modules: the encoder's hidden state at LLaVA's feature layer, less the
first token under the "default" strategy, is xc; the projector maps it to x; the question words are the
LLM input embeddings of the text tokens that follow the image's run of image tokens in its own prompt row,
up to the next image or the row's end, padding left out (the prompt's own tokens: policyc's `words=prompt`;
MMTok's keyword filter is not applied). Every vector is divided by max(its norm, 1e-8). Then

    P[r][j] = exp(z_r·x_j / tau_text) / Σ_j' exp(z_r·x_j' / tau_text) / m      (m words)
    Q[i][j] = exp(xc_i·xc_j / tau_vision) / Σ_j' exp(xc_i·xc_j' / tau_vision) / n
    C = rows of P, then rows of alpha·Q

and `count` times the unchosen j with the largest Σ_r max(0, C[r][j] - best[r]) is chosen (the first on
ties), best[r] = max(best[r], C[r][j]). Returns the kept slots [I, N] and the projected features [I, N, D].
`text_relevance_keep` ranks the tokens by the column sums of P without its 1/m (the `text_relevance` signal).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _unit(rows: Tensor) -> list[Tensor]:
    return [row.float() / max(float(row.float().norm()), 1e-8) for row in rows]


def _softmax_rows(scores: list[list[float]], temperature: float, scale: float) -> list[list[float]]:
    out = []
    for row in scores:
        top = max(row)
        e = [math.exp((s - top) / temperature) for s in row]
        total = sum(e)
        out.append([v / total * scale for v in e])
    return out


def greedy_cover(rows: list[list[float]], count: int) -> list[int]:
    n = len(rows[0])
    best = [0.0] * len(rows)
    chosen: list[int] = []
    while len(chosen) < min(count, n):
        pick, pick_gain = -1, -math.inf
        for j in range(n):
            if j in chosen:
                continue
            gain = sum(max(0.0, row[j] - b) for row, b in zip(rows, best, strict=True))
            if gain > pick_gain:
                pick, pick_gain = j, gain
        chosen.append(pick)
        best = [max(b, row[pick]) for row, b in zip(rows, best, strict=True)]
    return chosen


def question_words(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, images: int,
                   tokens: int) -> list[Tensor]:
    """Per image (images numbered along the rows, left to right), its question words' input embeddings."""
    image_id = model.config.image_token_id
    embed = model.get_input_embeddings()
    words = []
    for row in range(input_ids.shape[0]):
        ids, mask = input_ids[row].tolist(), attention_mask[row].tolist()
        runs = [p for p in range(len(ids)) if ids[p] == image_id and (p == 0 or ids[p - 1] != image_id)]
        for start in runs:
            after = []
            for p in range(start + tokens, len(ids)):
                if ids[p] == image_id:
                    break
                if mask[p]:
                    after.append(ids[p])
            words.append(embed(torch.tensor(after, dtype=torch.long)))
    assert len(words) == images
    return words


def _encoder_and_projected(model: torch.nn.Module, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    config = model.config
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    encoder = hidden[config.vision_feature_layer]
    if config.vision_feature_select_strategy == "default":
        encoder = encoder[:, 1:]
    return encoder, model.model.multi_modal_projector(encoder)


@torch.no_grad()
def text_relevance_keep(model: torch.nn.Module, inputs: dict[str, Tensor], count: int, tau: float) -> Tensor:
    """The kept slots [I, N] of `keep top count of vision by text_relevance(tau)` at projector.output: the
    column sums of P·m (P without its 1/m), the highest first, the earlier slot on ties."""
    _, projected = _encoder_and_projected(model, inputs["pixel_values"])
    images, n = projected.shape[:2]
    words = question_words(model, inputs["input_ids"], inputs["attention_mask"], images, n)
    kept = torch.zeros(images, n, dtype=torch.bool)
    for i in range(images):
        x, z = _unit(projected[i]), _unit(words[i])
        rows = _softmax_rows([[float(zr @ xj) for xj in x] for zr in z], tau, 1.0)
        scores = [sum(row[j] for row in rows) for j in range(n)]
        order = sorted(range(n), key=lambda j: (-scores[j], j))
        kept[i, order[:count]] = True
    return kept


@torch.no_grad()
def mmtok_image_features(model: torch.nn.Module, inputs: dict[str, Tensor], count: int, alpha: float = 0.5,
                         tau_text: float = 0.02, tau_vision: float = 0.2) -> tuple[Tensor, Tensor]:
    encoder, projected = _encoder_and_projected(model, inputs["pixel_values"])
    images, n = projected.shape[:2]
    words = question_words(model, inputs["input_ids"], inputs["attention_mask"], images, n)
    kept = torch.zeros(images, n, dtype=torch.bool)
    for i in range(images):
        x, xc, z = _unit(projected[i]), _unit(encoder[i]), _unit(words[i])
        text = [[float(zr @ xj) for xj in x] for zr in z]
        vision = [[float(a @ b) for b in xc] for a in xc]
        rows = _softmax_rows(text, tau_text, 1 / len(z)) if z else []
        rows += _softmax_rows(vision, tau_vision, alpha / n)
        kept[i, greedy_cover(rows, count)] = True
    return projected, kept


__all__ = ["greedy_cover", "mmtok_image_features", "question_words", "text_relevance_keep"]
