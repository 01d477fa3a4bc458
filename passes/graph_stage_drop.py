"""`stage_drop` (prefill): after each decoder layer that has a stage, choose the rows that stay and
narrow every sequence-long input of the later layers to them.

The rewrite of transformers5-feasibility.md §2 (FastV's drop after layer K on a torch.export graph),
generalised: `policyc::llm_stage` runs the policy's stages on layer K's output and its post-RoPE
query and key (read off the layer's attention call) and returns the kept rows [B, n]; the later
layers' hidden state, rotary cos/sin, mask rows and columns, and every symbolic size built from the
prompt length are rewired to the kept rows. Later layers then compute and cache only those rows.
Under `positions compact` the rotary of the kept rows is recomputed for positions 0..n-1.
"""

from __future__ import annotations

import operator

import torch
from policyc.passes.graph import (
    GraphContext,
    GraphPass,
    attention_node,
    depends_on_length,
    external_inputs,
    layer_output,
    register_graph_pass,
    rotary_nodes,
    sequence_dims,
    value_shape,
)
from torch import fx


@register_graph_pass
class StageDrop(GraphPass):
    name = "stage_drop"
    phase = "prefill"

    def run(self, graph: fx.Graph, ctx: GraphContext) -> bool:
        rotary = rotary_nodes(graph, ctx.layer_class)
        sized: set[fx.Node] = set()  # inserted symbolic sizes: kept lengths and sizes computed from them
        if not ctx.stage_layers:
            return False
        first = layer_output(graph, ctx.stage_layers[0], ctx.layer_class)
        for layer in ctx.stage_layers:
            rotary = self._drop_after(graph, layer, ctx, rotary, sized)
        nodes = list(graph.nodes)
        for node in nodes[nodes.index(first) + 1 :]:  # traced shapes of the full prompt no longer hold
            for key in ("val", "tensor_meta", "unbacked_bindings"):
                node.meta.pop(key, None)
        return True

    def _drop_after(self, graph: fx.Graph, layer: int, ctx: GraphContext, rotary: tuple[fx.Node, fx.Node],
                    sized: set[fx.Node]) -> tuple[fx.Node, fx.Node]:
        boundary = layer_output(graph, layer, ctx.layer_class)
        attention = attention_node(graph, layer, ctx.layer_class)
        nodes = list(graph.nodes)
        downstream = [n for n in nodes[nodes.index(boundary) + 1 :] if n.op != "output"]
        if not downstream:
            return rotary
        length = value_shape(boundary)[1]  # type: ignore[index]  # the prompt length as traced
        inside = set(downstream)
        cos, sin = rotary
        replacements: dict[fx.Node, fx.Node] = {}
        with graph.inserting_before(downstream[0]):
            rows = graph.call_function(torch.ops.policyc.llm_stage.default,
                                       (boundary, attention.args[0], attention.args[1], cos, sin, ctx.runtime, layer))
            kept = graph.call_function(torch.ops.aten.sym_size.int, (rows, 1))
            if ctx.compact:
                renumbered = graph.call_function(torch.ops.policyc.renumber.default, (boundary, rows, ctx.runtime))
                replacements[cos] = graph.call_function(operator.getitem, (renumbered, 0))
                replacements[sin] = graph.call_function(operator.getitem, (renumbered, 1))
            resized = _Resizer(graph, length, kept, sized)
            for node in external_inputs(downstream):
                if node in replacements:
                    continue
                if resized.applies(node):
                    replacements[node] = resized(node)
                    continue
                if node in ctx.masks or (_is_mask(node) and 2 in sequence_dims(node, length, ctx)):
                    # the prompt's mask [B, 1, L, keys]: each stage narrows the original again
                    source = ctx.masks.get(node, node)
                    replacements[node] = graph.call_function(torch.ops.policyc.prefill_mask.default,
                                                             (source, rows, ctx.runtime))
                    ctx.masks[replacements[node]] = source
                    continue
                dims = sequence_dims(node, length, ctx)
                if len(dims) > 1:
                    raise RuntimeError(f"{node.name} runs over the prompt along dims {dims}; only masks may")
                if dims:
                    replacements[node] = graph.call_function(torch.ops.policyc.take_rows.default,
                                                             (node, rows, dims[0]))
            sized.update(resized.inserted)
        for old, new in replacements.items():
            old.replace_all_uses_with(new, delete_user_cb=lambda user: user in inside)
            if new not in sized:
                ctx.sequence_dims[new] = sequence_dims(old, length, ctx)
        return replacements.get(cos, cos), replacements.get(sin, sin)


def _is_mask(node: fx.Node) -> bool:
    """The prompt's attention mask: [B, 1, L, keys], boolean or additive."""
    shape = value_shape(node)
    return shape is not None and len(shape) == 4 and shape[1] == 1


class _Resizer:
    """Recomputes symbolic sizes built from the prompt length (e.g. batch * length for a reshape) from
    the kept length."""

    def __init__(self, graph: fx.Graph, length: object, kept: fx.Node, sized: set[fx.Node]) -> None:
        self.graph, self.length, self.kept, self.sized = graph, length, kept, sized
        self.inserted: set[fx.Node] = {kept}

    def applies(self, node: object) -> bool:
        return isinstance(node, fx.Node) and (node in self.sized or depends_on_length(node, self.length))

    def __call__(self, node: fx.Node) -> fx.Node:
        value = node.meta.get("val")
        is_length = isinstance(value, torch.SymInt) and isinstance(self.length, torch.SymInt) and \
            value.node.expr == self.length.node.expr
        if is_length or node.op != "call_function" or node.target == torch.ops.aten.sym_size.int:
            return self.kept  # the length itself, or (inserted earlier) a previous stage's kept length
        args = tuple(self(a) if self.applies(a) else a for a in node.args)
        resized = self.graph.call_function(node.target, args)  # type: ignore[arg-type]
        self.inserted.add(resized)
        return resized


