"""FX graph passes: the base class, their registry, and what they share about captured LLM graphs.

A pass rewrites one aten-level graph of the LLM decoder as `torch.compile` (dynamo + aot_autograd)
captures it: the prefill graph runs every decoder layer over the prompt. (Decoding is realised at
module level: layers that dropped tokens hold shorter caches than transformers' masks assume, which
dynamo rejects while tracing, before any pass could run.) Nodes know their decoder layer through
`nn_module_stack`. Passes insert the policyc operators of policyc/runtime/ops.py, so the graph does
what the eager backend does.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from policyc.passes.base import registrar
from torch import fx

Phase = Literal["prefill", "decode"]


@dataclass
class GraphContext:
    """What passes know about the model and policy, and what they leave for later passes."""

    runtime: int  # handle of the runtime (policyc.runtime.ops.register)
    layer_class: type  # the decoder layer's class, to read layer indices off nn_module_stack
    stage_layers: tuple[int, ...]  # decoder layers after which a stage drops tokens, ascending
    num_layers: int
    compact: bool  # `positions compact`: later layers renumber kept tokens
    # Nodes a pass inserted, with the dims along which they run over the sequence (their metadata is
    # not propagated, so later passes read it here).
    sequence_dims: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    masks: dict[fx.Node, fx.Node] = field(default_factory=dict)  # an inserted mask -> the prompt's mask it narrows


class GraphPass(ABC):
    """One rewrite of a captured graph. Subclasses set `name` and `phase` and write `run`."""

    name: ClassVar[str]
    phase: ClassVar[Phase]

    @abstractmethod
    def run(self, graph: fx.Graph, ctx: GraphContext) -> bool:
        """Rewrite `graph` in place; return whether anything changed."""


GRAPH_PASSES: dict[str, GraphPass] = {}  # run on every captured graph of their phase, in registration order
register_graph_pass = registrar(GRAPH_PASSES, "graph pass")


# ---------------------------------------------------------------- reading captured graphs
def layer_of(node: fx.Node, layer_class: type) -> int | None:
    """The decoder layer a node was traced in, or None (embedding, mask, rotary, final norm)."""
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        if cls is layer_class or getattr(cls, "__name__", cls) == layer_class.__name__:
            return int(re.findall(r"\.(\d+)(?=\.|$)", str(path))[-1])  # "...layers.3" or "...layers.3.inner"
    return None


def is_attention(node: fx.Node) -> bool:
    """An aten scaled-dot-product attention call (any backend variant)."""
    return node.op == "call_function" and "scaled_dot_product" in str(node.target)


def attention_node(graph: fx.Graph, layer: int, layer_class: type) -> fx.Node:
    found = [n for n in graph.nodes if is_attention(n) and layer_of(n, layer_class) == layer]
    if len(found) != 1:
        raise RuntimeError(f"expected one attention call in decoder layer {layer}, found {len(found)}")
    return found[0]


def layer_output(graph: fx.Graph, layer: int, layer_class: type) -> fx.Node:
    """The hidden state a decoder layer hands on: the last node traced inside it (the MLP residual add)."""
    last = None
    for node in graph.nodes:
        if layer_of(node, layer_class) == layer:
            last = node
    if last is None:
        raise RuntimeError(f"decoder layer {layer} is not in the captured graph")
    return last


def rotary_nodes(graph: fx.Graph, layer_class: type) -> tuple[fx.Node, fx.Node]:
    """The shared rotary cos and sin as the decoder layers read them: from aten.cos / aten.sin, the chain
    of single-use nodes outside the layers (e.g. the attention-scaling multiply) up to the layers."""
    found = []
    for trig in (torch.ops.aten.cos.default, torch.ops.aten.sin.default):
        node = next(n for n in graph.nodes if n.target == trig)
        while len(node.users) == 1 and layer_of(next(iter(node.users)), layer_class) is None:
            node = next(iter(node.users))
        found.append(node)
    return found[0], found[1]


def value_shape(node: object) -> tuple | None:
    """The traced shape of a tensor node, or None."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def sequence_dims(node: fx.Node, length: object, ctx: GraphContext) -> tuple[int, ...]:
    """The dims along which a tensor node runs over the prompt (its size is the symbolic `length`)."""
    if node in ctx.sequence_dims:
        return ctx.sequence_dims[node]
    shape = value_shape(node)
    if shape is None:
        return ()
    return tuple(d for d, size in enumerate(shape) if d > 0 and _same_size(size, length))


def depends_on_length(node: fx.Node, length: object) -> bool:
    """A symbolic integer node whose value involves the sequence length."""
    value = node.meta.get("val")
    if not isinstance(value, torch.SymInt) or not isinstance(length, torch.SymInt):
        return False
    return bool(length.node.expr.free_symbols & value.node.expr.free_symbols)


def _same_size(size: object, length: object) -> bool:
    if isinstance(size, torch.SymInt) and isinstance(length, torch.SymInt):
        return size.node.expr == length.node.expr
    return False


def external_inputs(nodes: Iterable[fx.Node]) -> list[fx.Node]:
    """Nodes the given ones read but do not contain, in first-use order."""
    inside = set(nodes)
    seen: dict[fx.Node, None] = {}
    for node in inside:
        for arg in node.all_input_nodes:
            if arg not in inside:
                seen.setdefault(arg)
    order = {n: i for i, n in enumerate(next(iter(inside)).graph.nodes)} if inside else {}
    return sorted(seen, key=lambda n: order[n])


