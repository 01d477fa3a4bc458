"""Linear-attention layers of hybrid LLMs (Qwen3.5's Gated DeltaNet, arXiv:2412.06464) under a policy.

A linear layer has no positions and no attention: a causal depthwise conv and a gated delta-rule recurrence run over
its input rows in order, and its cache is a fixed-size state (`LinearAttentionLayer`: conv and recurrent states).
Its mask is transformers' 2-D padding mask [B, L] (`create_recurrent_attention_mask`), which zeroes padded rows
before the conv, or None (no padding, and every one-token decode step).

- Prefill: the layer runs over the rows still alive (`state.kept`), as neighbours: kept tokens simply follow each
  other in the recurrence. Its 2-D mask is gathered to those rows.
- Fillers (samples of a batch keeping fewer rows than the widest one carry some dropped rows on, masked as keys in
  the attention layers): a masked row in the middle of a DeltaNet's sequence is not neutral (the zeroed input still
  decays the state and the conv mixes it with its neighbours), but masked rows before every real token are, as left
  padding is. So the layer sees its rows reordered, fillers and padding first, then the real rows in order; its
  output goes back to the runtime's order. The state it leaves for decoding summarises exactly the real kept rows.
- Decoding: a one-token step needs nothing (no mask, no positions, no per-row cache to remap).
"""

from __future__ import annotations

import torch

from policyc.runtime.compiled import PolicyLayer
from policyc.runtime.rows import gather_rows


class LinearPolicyLayer(PolicyLayer):
    """A linear-attention decoder layer that runs over the rows still alive (fillers and padding first)."""

    def forward(self, hidden_states: torch.Tensor, **kwargs: object) -> torch.Tensor:
        runtime, state = self.runtime, self.runtime.state
        if state is None or hidden_states.shape[1] <= 1:  # no prompt, or a decode step: nothing to remap
            return self.inner(hidden_states, **kwargs)
        if self.index == 0:
            hidden_states = runtime.drop_before_llm(hidden_states)
            if runtime.rates_text:
                runtime.rate_text(hidden_states)
        live = state.live()  # None unless the batch's samples keep different counts (fillers)
        runtime.kept_at_layer[self.index], runtime.live_at_layer[self.index] = state.kept, live
        order = None
        if state.kept.shape[1] < state.length or live is not None:
            kwargs, order = linear_prefill(kwargs, state.kept, state.valid, live)
        if order is None:
            output = self.inner(hidden_states, **kwargs)
        else:  # fillers and padding first; the output back in the runtime's row order
            ordered = self.inner(gather_rows(hidden_states, order, 1), **kwargs)
            output = torch.empty_like(ordered).scatter_(1, order[:, :, None].expand_as(ordered), ordered)
        if self.stages:
            output = self._apply_stages(output, kwargs)
        return output


def linear_prefill(kwargs: dict[str, object], kept: torch.Tensor, valid: torch.Tensor, live: torch.Tensor | None,
                   ) -> tuple[dict[str, object], torch.Tensor | None]:
    """A linear layer's prefill inputs for the rows `kept` [B, L'] (original positions; `live` [B, L']: which are no
    fillers; `valid` [B, L]: which positions are real tokens): its 2-D mask over those rows, and where fillers exist
    the order [B, L'] in which it sees them (fillers and padding first, then the real rows in order) and its mask in
    that order; None where the rows stay in order. The rotary inputs follow `kept` (the layer reads none: the
    stages bound to it do)."""
    out = dict(kwargs)
    cos, sin = kwargs["position_embeddings"]  # type: ignore[misc]
    out["position_embeddings"] = (gather_rows(cos, kept, 1), gather_rows(sin, kept, 1))
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor):
        out["position_ids"] = gather_rows(position_ids, kept, position_ids.dim() - 1)
    mask = kwargs.get("attention_mask")
    if live is None:
        if isinstance(mask, torch.Tensor):
            out["attention_mask"] = gather_rows(mask, kept, 1)
        return out, None
    real = torch.gather(valid, 1, kept) & live
    order = torch.sort(real.to(torch.int8), dim=1, stable=True).indices  # masked rows first, each part in order
    dtype = mask.dtype if isinstance(mask, torch.Tensor) else torch.long
    out["attention_mask"] = torch.gather(real, 1, order).to(dtype)
    return out, order


__all__ = ["LinearPolicyLayer", "linear_prefill"]
