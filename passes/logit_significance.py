"""`logit_significance(direction=auto|received|given)`: FoPru's token significance (arXiv:2411.14164, as
coded in HydraInfer's `focal_prunning`, the only implementation found; it is not the authors').

At an encoder layer, over the image tokens V alive (CLS row and column left out), from the layer's
PRE-softmax attention logits S_h[i, j] = q_h,i · k_h,j · scale (queries and keys [H, |V|, d]), mean over heads:
  received c_j = mean_i mean_h S_h[i, j] = mean_h (mean_i q_h,i) · k_h,j · scale     (what token j receives)
  given    r_i = mean_j mean_h S_h[i, j] = mean_h q_h,i · (mean_j k_h,j) · scale     (what token i gives)
Both are O(|V|·d): means of logits need no |V| x |V| matrix. `auto` (the code's rule) takes, per image,
c if var(c) > var(r) else r (unbiased variances, as torch.var).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Option, Spec
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class LogitSignificance(SignalOp):
    spec = Spec("logit_significance", "signal", "mean pre-softmax attention logit each image token receives or "
                "gives among the image tokens, mean over heads; auto: the higher-variance one per image (FoPru)",
                options=(Option("direction", ("enum",), "received (column mean), given (row mean), or auto: the "
                                "one with the higher variance per image", default="auto",
                                choices=("auto", "received", "given")),),
                stages=frozenset({"encoder"}), paper="FoPru arXiv:2411.14164")

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        recorded = ctx.recorded("logit_significance")
        direction = self.option(call, "direction", ctx)
        chosen = direction.id if isinstance(direction, ir.Name) else "auto"
        vision = ctx.builtin("vision").gather(1, ctx.state.kept)  # [B, L'] current rows that are image tokens
        query, key = recorded.query.float(), recorded.key.float()  # [B, H, L', d] (an encoder: as many key heads)
        weights = vision.to(query.dtype)[:, None, :, None]  # [B, 1, L', 1]
        count = vision.sum(1).clamp(min=1).to(query.dtype)[:, None, None]  # [B, 1, 1]
        mean_query = (query * weights).sum(2) / count  # [B, H, d]
        mean_key = (key * weights).sum(2) / count
        received = torch.einsum("bhd,bhnd->bn", mean_query, key) / query.shape[1] * recorded.scaling  # [B, L']
        given = torch.einsum("bhnd,bhd->bn", query, mean_key) / query.shape[1] * recorded.scaling
        if chosen == "received":
            scores = received
        elif chosen == "given":
            scores = given
        else:
            picks = [bool(received[b][vision[b]].var() > given[b][vision[b]].var()) for b in range(vision.shape[0])]
            scores = torch.where(torch.tensor(picks, device=vision.device)[:, None], received, given)
        return scatter_scores(scores.masked_fill(~vision, 0.0), ctx)
