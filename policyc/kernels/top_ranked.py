"""The `count` best-scoring tokens of a candidate set (`top K of SET by SCORE`: FastV arXiv:2403.06764, SparseVLM,
PyramidDrop, VisionZip; H2O arXiv:2306.14048's heavy hitters and SnapKV's kept prefix over cache slots): two stable
sorts and one scatter, fused by torch.compile where fusion is on, for any kept count without recompiling."""

from __future__ import annotations

import torch

from policyc.kernels.base import Kernel, register_kernel


@register_kernel
class TopRanked(Kernel):
    name = "top_ranked"

    def compute(self, score: torch.Tensor, among: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """score [..., L] float, among [..., L] bool, counts [...] long -> [..., L] bool: the `counts` highest-scoring
        tokens of `among` in each row (all of them where a row has fewer); ties go to the earlier position, and a
        candidate scoring -inf still ranks before every token outside `among`."""
        best = torch.sort(score.float(), dim=-1, descending=True, stable=True).indices  # best first, ties earlier
        candidates_first = torch.sort((~among.gather(-1, best)).to(torch.int8), dim=-1, stable=True).indices
        order = best.gather(-1, candidates_first)  # the candidates by score, then the others
        take = torch.arange(score.shape[-1], device=score.device) < counts[..., None]
        return torch.zeros_like(among).scatter(-1, order, take) & among
