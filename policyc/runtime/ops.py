"""Custom torch operators that the graph passes (passes/graph_*.py) insert into captured FX graphs.

Each is a thin call into the same runtime code the eager backend runs, so both backends select the
same tokens. Inductor treats them as opaque kernels and fuses the model's own ops around them.
Operators find their runtime through an integer handle baked into the graph (`register`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from policyc.errors import PolicyError

if TYPE_CHECKING:
    from policyc.runtime.compiled import Runtime

_RUNTIMES: dict[int, Runtime] = {}


def register(runtime: Runtime) -> int:
    """A handle for `runtime` that graphs can carry as an int argument."""
    _RUNTIMES[id(runtime)] = runtime
    return id(runtime)


def unregister(handle: int) -> None:
    _RUNTIMES.pop(handle, None)


def _runtime(handle: int) -> Runtime:
    runtime = _RUNTIMES.get(handle)
    if runtime is None or runtime.state is None:
        raise PolicyError.at("a compiled graph ran after its policy was removed, or before any prompt", None)
    return runtime


@torch.library.custom_op("policyc::llm_stage", mutates_args=())
def llm_stage(hidden: Tensor, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor, runtime: int,
              layer: int) -> Tensor:
    """The stages bound to decoder layer `layer`, on its output hidden [B, L', D] with its post-RoPE
    query [B, H, L', d] and key; returns the rows that stay, [B, n] (indices into the L' rows)."""
    from policyc.runtime.evaluate import Captured

    state = _runtime(runtime)
    adapter = state.plan.adapter
    # A static cache hands attention all its slots; the prompt's rows fill the first ones.
    captured = Captured(query, key[:, :, : query.shape[2]], float(adapter.decoder_attention[layer].scaling))
    rows = state.select(layer, state.plan.at("llm.layer", layer), hidden, captured, (cos, sin))
    state.stages_ran.add(layer)
    for later in range(layer + 1, len(adapter.decoder_layers)):
        state.kept_at_layer[later] = state.state.kept  # type: ignore[union-attr]
    return rows.contiguous()  # compilers expect the strides of a fresh tensor


@llm_stage.register_fake
def _(hidden: Tensor, query: Tensor, key: Tensor, cos: Tensor, sin: Tensor, runtime: int, layer: int) -> Tensor:
    kept = torch.library.get_ctx().new_dynamic_size()
    return hidden.new_empty((hidden.shape[0], kept), dtype=torch.long)


@torch.library.custom_op("policyc::take_rows", mutates_args=())
def take_rows(x: Tensor, rows: Tensor, dim: int) -> Tensor:
    """x gathered along `dim` with per-sample rows [B, n] (a batch of 1 broadcasts)."""
    from policyc.runtime.rows import gather_rows

    return gather_rows(x, rows, dim)


@take_rows.register_fake
def _(x: Tensor, rows: Tensor, dim: int) -> Tensor:
    shape = list(x.shape)
    shape[0], shape[dim] = rows.shape[0], rows.shape[1]
    return x.new_empty(shape)


@torch.library.custom_op("policyc::prefill_mask", mutates_args=())
def prefill_mask(mask: Tensor, rows: Tensor, runtime: int) -> Tensor:
    """The prompt's mask [B, 1, L, W] narrowed to the kept rows, [B, 1, n, W']: W' = n with a dynamic cache,
    or a static cache's slot count (its first n slots hold the kept rows, the rest stay masked).
    `rows` orders the call after the stage that chose them."""
    from policyc.runtime.rows import gather_rows, remap_columns

    state = _runtime(runtime)
    prefill = state.state
    kept = prefill.kept  # type: ignore[union-attr]
    return remap_columns(gather_rows(mask, kept, 2), kept, prefill.length, state.static)  # type: ignore[union-attr]


@prefill_mask.register_fake
def _(mask: Tensor, rows: Tensor, runtime: int) -> Tensor:
    width = mask.shape[-1] if _RUNTIMES[runtime].static else rows.shape[1]
    return mask.new_empty((rows.shape[0], mask.shape[1], rows.shape[1], width))


@torch.library.custom_op("policyc::renumber", mutates_args=())
def renumber(hidden: Tensor, rows: Tensor, runtime: int) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin [B, n, d] for the kept rows renumbered 0..n-1 over real tokens (`positions compact`).
    `rows` orders the call after the stage that chose them."""
    from policyc.runtime.rows import compact_positions

    state = _runtime(runtime)
    positions = compact_positions(state.state.valid, state.state.kept)  # type: ignore[union-attr]
    cos, sin = state.plan.adapter.rotary(hidden, position_ids=positions)  # type: ignore[misc]
    return cos.contiguous(), sin.contiguous()


@renumber.register_fake
def _(hidden: Tensor, rows: Tensor, runtime: int) -> tuple[Tensor, Tensor]:
    shape = (rows.shape[0], rows.shape[1], _head_dim(runtime))  # the kept rows, not the prompt
    return hidden.new_empty(shape), hidden.new_empty(shape)


def _head_dim(handle: int) -> int:
    return _RUNTIMES[handle].plan.adapter.head_dim
