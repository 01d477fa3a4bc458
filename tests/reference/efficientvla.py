"""EfficientVLA's visual-token selection (Yang et al., arXiv:2506.10100 §3.3 Eqs. 2-5; no public code), written
plainly from the paper; shares no code with policyc.

After decoder layer `layer`, per row, with A that layer's post-softmax attention averaged over heads ([L, L]),
V the image tokens and T the real tokens after the first image token that are no image tokens:
- r_i = sum_{j in T} A[j, i] for i in V (instruction rows -> visual columns, the direction a causal mask leaves
  usable; the paper writes v_i as the query), s = (r - min r) / (max r - min r) (s = 0 when r is constant);
- V_key = the K_key best by s; V_task = the next floor(alpha * (K_final - K_key)) best by s among the others;
- V_div = the K_aug - floor(alpha * K_aug) tokens (K_aug = K_final - K_key) among the rest with the largest
  1 - max_{k in V_key} cos(h_j, h_k), h the layer's output hidden states (one shot, against V_key only).
Every count is capped by the tokens left; "best" is a descending stable sort (ties to the earlier token). The kept
image tokens are V_key | V_task | V_div; the later layers run on them and the text at their original positions
(tests/reference/llm_stage.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from transformers import LlavaForConditionalGeneration

from reference.llm_stage import Pick, llava_llm_inputs, llm_stage_generate


def _best(scores: Tensor, count: int) -> Tensor:
    """Indices of the `count` highest `scores`, ties to the lower index."""
    return torch.sort(scores, descending=True, stable=True).indices[:count]


def efficientvla_pick(k_final: int, k_key: int, alpha: float) -> Pick:
    k_task = math.floor(alpha * (k_final - k_key))
    k_div = k_final - k_key - k_task

    def pick(_row: int, hidden: Tensor, probs: Tensor, valid: Tensor, image: Tensor) -> Tensor:
        attention = probs.mean(0)
        positions = torch.arange(image.shape[0])
        first_image = int(image.nonzero()[0])
        text = valid & ~image & (positions > first_image)
        vision = (valid & image).nonzero().flatten()
        r = attention[text][:, vision].sum(0)
        spread = r.max() - r.min()
        s = (r - r.min()) / spread if spread > 0 else torch.zeros_like(r)
        key = _best(s, k_key)
        rest = torch.tensor([i for i in range(len(vision)) if i not in set(key.tolist())], dtype=torch.long)
        task = rest[_best(s[rest], k_task)]
        left = torch.tensor([i for i in rest.tolist() if i not in set(task.tolist())], dtype=torch.long)
        h = hidden[vision].float()
        unit = h / h.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        similar = (unit[left] @ unit[key].T).amax(1) if len(key) and len(left) else torch.zeros(len(left))
        varied = left[_best(1 - similar, k_div)]
        return vision[torch.cat([key, task, varied])]
    return pick


@torch.no_grad()
def efficientvla_generate(model: LlavaForConditionalGeneration, input_ids: Tensor, attention_mask: Tensor,
                          pixel_values: Tensor, *, layer: int, k_final: int, k_key: int, alpha: float,
                          max_new_tokens: int) -> tuple[Tensor, list[Tensor], Tensor]:
    """Greedy tokens [B, T], per row the kept image positions (ascending), logits [B, T, V]."""
    ref, embeds, valid, image = llava_llm_inputs(model, input_ids, attention_mask, pixel_values)
    return llm_stage_generate(ref, embeds, valid, image, layer=layer, pick=efficientvla_pick(k_final, k_key, alpha),
                              max_new_tokens=max_new_tokens)


__all__ = ["efficientvla_generate", "efficientvla_pick"]
