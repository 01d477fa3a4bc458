"""Runtime guards: cheap checks that a compiled model never silently keeps the wrong tokens.

After each stage the runtime checks that the kept rows are valid indices in strictly increasing order (so in
range, sorted and unique), that every protected token is still alive, and that the scores a selection ranks
by hold no NaN. A violation raises `GuardError` naming the stage, the layer and the sample, at the policy's
line. Each check is one reduction and one host sync per stage.
"""

from __future__ import annotations

import torch

from policyc.errors import PolicyError
from policyc.lang.ir import Span


class GuardError(PolicyError):
    """A compiled policy broke one of the runtime's invariants (a bug or a model producing NaN), not a
    problem the policy's author can fix by editing the policy alone."""


def _first_bad_row(bad: torch.Tensor) -> int:
    return int(torch.nonzero(bad.reshape(bad.shape[0], -1).any(1))[0, 0])


def check_kept(kept: torch.Tensor, length: int, where: str, span: Span | None) -> None:
    """`kept` [B, n]: original positions in strictly increasing order, each in [0, length)."""
    if kept.numel() == 0:
        return
    order = kept[:, 1:] <= kept[:, :-1]
    outside = (kept < 0) | (kept >= length)
    if bool(order.any() | outside.any()):
        what = "out of range" if bool(outside.any()) else "not sorted or repeated"
        row = _first_bad_row(outside if what == "out of range" else order)
        raise GuardError.at(f"runtime guard: {where} kept token indices {what} (sample {row}: "
                            f"{kept[row].tolist()[:16]}{' ...' if kept.shape[1] > 16 else ''}, length {length})",
                            span, "this is a policyc bug: please report it with the policy and the model config")


def check_protected(protected: torch.Tensor, alive: torch.Tensor, where: str, span: Span | None) -> None:
    """Every protected token ([B, L] bool) is still alive ([B, L] bool)."""
    lost = protected & ~alive
    if bool(lost.any()):
        row = _first_bad_row(lost)
        raise GuardError.at(f"runtime guard: {where} dropped protected tokens (sample {row}, positions "
                            f"{torch.nonzero(lost[row]).flatten().tolist()[:16]})", span,
                            "this is a policyc bug: please report it with the policy and the model config")


def check_scores(scores: torch.Tensor, over: torch.Tensor, where: str, span: Span | None) -> None:
    """No NaN among `scores` [B, L] at the tokens `over` [B, L] bool (the tokens a selection ranks)."""
    bad = torch.isnan(scores) & over
    if bool(bad.any()):
        row = _first_bad_row(bad)
        raise GuardError.at(f"runtime guard: {where} scored {int(bad[row].sum())} tokens NaN (sample {row}); "
                            "ranking them would keep arbitrary tokens", span,
                            "the model produced NaN (check its weights and dtype: fp16 overflow is common)")
