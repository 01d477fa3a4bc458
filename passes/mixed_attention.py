"""`mixed_attention`: GTP-ViT's MixedAttnMax token score (Xu et al., "GTP-ViT: Efficient Vision Transformers via
Graph-based Token Propagation", WACV'24; Ackesnal/GTP-ViT `models_v3.py`; algorithms-more.md §8 (c)).

From the encoder layer's own post-softmax attention A_h [L', L'] over the current rows (log(size) key biases
included after a proportional merge, as the layer ran): diag_j = max_h A_h[j, j] (self-attention), col_j =
max_h Σ_i A_h[i, j] (attention received from every row, CLS included), score_j = diag_j · col_j. Encoder only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from policyc.passes.base import SignalOp, register_signal, scatter_scores

from policyc.catalog.base import Spec
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


@register_signal
class MixedAttention(SignalOp):
    spec = Spec("mixed_attention", "signal", "GTP-ViT's MixedAttnMax: each token's self-attention times the "
                "attention it receives from all rows, each the max over heads", stages=frozenset({"encoder"}),
                paper="GTP-ViT WACV'24")

    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        if ctx.causal:
            raise PolicyError.at("mixed_attention reads a vision encoder layer's attention", call.span)
        recorded = ctx.recorded("mixed_attention")  # on the current rows [B, H, L', d]
        key_valid = ctx.state.valid.gather(1, ctx.state.kept)  # [B, L']
        if (live := ctx.state.live()) is not None:
            key_valid = key_valid & live
        rows = torch.arange(key_valid.shape[1], device=key_valid.device).expand_as(key_valid)
        visible = key_valid[:, :, None] & key_valid[:, None, :]  # [B, L', L'] real rows see real keys
        probabilities = KERNELS["attention_rows"](recorded.query, recorded.key, recorded.scaling, rows, visible,
                                                  recorded.bias)  # [B, H, L', L']
        diagonal = probabilities.diagonal(dim1=2, dim2=3).amax(1)  # [B, L']
        received = probabilities.sum(2).amax(1)  # [B, L']
        return scatter_scores(diagonal * received, ctx)
