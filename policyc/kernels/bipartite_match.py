"""ToMe's bipartite soft matching (arXiv:2210.09461): rows alternate between sets A (even) and B (odd); every A row
of the merge set finds its most similar B row, and A rows are ranked by that similarity. One fused similarity
product, mask, max and sort where fusion is on."""

from __future__ import annotations

import torch

from policyc.kernels.base import Kernel, register_kernel


@register_kernel
class BipartiteMatch(Kernel):
    name = "bipartite_match"

    def compute(self, metric: torch.Tensor, sources: torch.Tensor, targets: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """metric [B, L, C] unit vectors; sources, targets [B, L] bool (which rows may fold, which may receive) ->
        best [B, |A|] float (cosine of each A row's best B match, -inf where none is allowed), match [B, |A|] long
        (its index among the B rows) and order [B, |A|] long (A rows, best-matched first; ties earlier)."""
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
        allowed = sources[:, ::2, None] & targets[:, None, 1::2]
        best, match = scores.masked_fill(~allowed, float("-inf")).max(-1)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        return best, match, order
