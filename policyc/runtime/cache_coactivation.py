"""The score source of `cache coactivation` (passes/cache_coactivation.py, CoreMatching): MLP hooks, not attention.

In prefill, a forward hook on each affected layer's MLP recomputes the SwiGLU intermediate
a = act_fn(gate_proj(x)) * up_proj(x) ([B, L', m]) and scores each row by the neurons it shares with the
reference row (sum over m of [a[row] > 0] * [a[reference] > 0]); rows that are not real image tokens score
`NOT_IMAGE`. The scores, [B, Hkv, L'] (one per cached row, the same for every key/value head), become the
layer's `Slots.scores` when its cache turns into slots after prefill.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from policyc.passes.cache_coactivation import NOT_IMAGE, Coactivation

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from policyc.runtime.cache import CacheRuntime


def install_coactivation(cache: CacheRuntime) -> list[RemovableHandle]:
    """Hook the MLP of every layer the operator affects; returns the hook handles."""
    op = cache.op
    assert isinstance(op, Coactivation)  # the cache runtime installs this for `scores = "coactivation"` only
    adapter = cache.plan.adapter
    handles = []
    for index in op.affected_layers(len(adapter.decoder_layers)):
        mlp = getattr(adapter.decoder_layers[index], "mlp", None)
        if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "act_fn")):
            raise cache.error(f"cache coactivation needs a gated MLP (gate_proj, up_proj, act_fn) in decoder layer "
                              f"{index}; {type(mlp).__name__} has none")
        handles.append(mlp.register_forward_hook(_recorder(cache, index)))
    return handles


def _recorder(cache: CacheRuntime, index: int):  # type: ignore[no-untyped-def]
    def record(mlp: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x, state = args[0], cache.runtime.state
        if x.shape[1] <= 1 or state is None:  # decode steps change nothing
            return
        kept = cache.runtime.kept_at_layer.get(index)
        if kept is None:
            kept = torch.arange(state.length, device=x.device).expand(x.shape[0], -1)
        real = cache.runtime.real_rows(index) if index in cache.runtime.kept_at_layer else state.valid
        image = torch.gather(state.image, 1, kept) & real
        with torch.no_grad():
            fires = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)) > 0  # [B, L', m]
        scores = torch.full(kept.shape, NOT_IMAGE, dtype=torch.float32, device=x.device)
        for b in range(x.shape[0]):
            reference = cache.op.reference_row(real[b])  # type: ignore[attr-defined]
            shared = (fires[b] & fires[b, reference]).sum(-1).float()  # [L']
            scores[b] = torch.where(image[b], shared, scores[b])
        heads = cache.plan.adapter.num_kv_heads
        cache.prefill_scores[index] = scores[:, None, :].expand(-1, heads, -1).contiguous()
    return record
