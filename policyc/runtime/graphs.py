"""The graph backends: the LLM decoder is captured by `torch.compile` (dynamo + aot_autograd), the
policy's graph passes (passes/graph_*.py) rewrite its aten graphs, and inductor compiles the result
(`inductor`), or the rewritten graphs run as they are (`fx`, to tell a pass from inductor).

One graph for the prefill (every decoder layer; stages dropping rows in-graph) and one for decoding
in the common case; transformers' extension points still do what has no graph (the prompt's image
positions, read by a pre-hook; decode masks and positions of layers with shorter caches). The eager
backend is the reference semantics: both call the same stage code (policyc/runtime/ops.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._dynamo.backends.common import aot_autograd

from policyc.passes.graph import GRAPH_PASSES, GraphContext, Phase, is_attention, layer_of
from policyc.runtime import ops  # noqa: F401  (registers the policyc:: operators)
from policyc.runtime.patching import replace_attribute


@dataclass
class CapturedGraph:
    """A graph as the passes left it (`policyc compile --emit fx` prints these)."""

    phase: Phase | None  # None: a piece of a graph with no decoder layer in it
    module: fx.GraphModule
    passes: tuple[str, ...]  # the passes that changed it


@dataclass
class GraphBackend:
    """A torch.compile backend that runs policyc's graph passes on the aten graphs aot_autograd captures,
    then compiles the rewritten graphs with inductor (or, `inductor=False`, runs them as they are)."""

    make_context: Callable[[], GraphContext]
    inductor: bool = True
    graphs: list[CapturedGraph] = field(default_factory=list)

    def __call__(self, module: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        return aot_autograd(fw_compiler=self._compile)(module, example_inputs)

    def _compile(self, module: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        ctx = self.make_context()
        phase = _phase(module.graph, ctx)
        changed = tuple(p.name for p in GRAPH_PASSES.values() if p.phase == phase and p.run(module.graph, ctx))
        if phase == "prefill" and ctx.stage_layers and not changed:
            raise RuntimeError("the prefill graph was captured without the stage passes applying")
        module.graph.lint()
        module.recompile()
        self.graphs.append(CapturedGraph(phase, module, changed))
        if not self.inductor:
            return module.forward
        from torch._functorch.aot_autograd import make_boxed_func
        from torch._inductor.compile_fx import compile_fx

        # Inductor traces the rewritten graph afresh: outside the capture's tracing context, whose recorded
        # outputs still have the prompt's length (inductor would equate the kept length with it).
        with torch._guards.tracing(None):
            return make_boxed_func(compile_fx(module, example_inputs))


def _phase(graph: fx.Graph, ctx: GraphContext) -> Phase | None:
    """Decode graphs score one new token: their attention calls have a single query row. Graphs with no
    decoder layer (pieces around a graph break) belong to neither."""
    attention = next((n for n in graph.nodes if is_attention(n) and layer_of(n, ctx.layer_class) is not None), None)
    if attention is None:
        return None
    shape = attention.args[0].meta["val"].shape  # type: ignore[union-attr]
    return "decode" if isinstance(shape[2], int) and shape[2] == 1 else "prefill"


def compile_decoder(decoder: torch.nn.Module, backend: GraphBackend) -> Callable[[], None]:
    """Route `decoder`'s forward through torch.compile with `backend`; returns the undo."""
    inner = decoder.forward
    compiled = torch.compile(inner, backend=backend, dynamic=True)

    @torch.compiler.disable  # inside another compiled region: a graph break there, and this backend's own graphs
    def run_compiled(*args: Any, **kwargs: Any) -> Any:
        # policyc::llm_stage returns as many rows as the stages keep: a data-dependent size.
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return compiled(*args, **kwargs)

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and not _prefill(args, kwargs):  # a decode step inside another compiled
            return inner(*args, **kwargs)  # region (transformers' compiled static-cache decode): traced there
        return run_compiled(*args, **kwargs)  # a prefill, even under a user's torch.compile of the whole model

    return replace_attribute(decoder, "forward", forward)


def _prefill(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a decoder call holds a prompt (more than one row per sample) rather than one decode token."""
    rows = next((v for v in (kwargs.get("inputs_embeds"), kwargs.get("input_ids"), *args[:1])
                 if isinstance(v, torch.Tensor)), None)
    return rows is not None and rows.shape[1] > 1
