"""The eager backend: realise a plan on a transformers model with its own extension points.

- The LLM's attention runs through a registered SDPA function that records post-RoPE queries and
  keys where a stage reads attention (no `output_attentions`, no eager attention).
- Decoder layers from the first pruning layer on are wrapped: a wrapper gathers the rotary
  embeddings, mask and position ids of the rows still alive, and the wrapper at a stage's layer
  evaluates the stage and drops rows from its output; a stage's merge (`merge nearest`, VisionDrop) first
  folds rows into their targets in that output (llm.py `merge_rows`). Kept tokens keep their original positions,
  or are renumbered 0..n-1 (`positions compact` and `cache_length`).
- During decoding, layers after a drop hold fewer cached keys; their mask columns are gathered, and
  their position ids follow the policy's position mode, per layer (policyc/runtime/llm.py
  `Runtime.decode_shift`). `generate()`, the cache classes and padding need no other change.
- Where the samples of a batch keep different counts, the sample keeping fewer carries some of its
  dropped rows on as fillers, masked as keys everywhere (`Runtime.live_at_layer`).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from policyc.compiler.plan import BoundStage, Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.models.structure import LINEAR_ATTENTION, linear_layers
from policyc.runtime.attention import register
from policyc.runtime.cache import CacheRuntime
from policyc.runtime.evaluate import Captured
from policyc.runtime.llm import ImageSource, Runtime
from policyc.runtime.patching import LayerWrapper, replace_attribute
from policyc.runtime.rows import compact_positions, gather_decode, gather_prefill, is_static
from policyc.runtime.support import check_supported
from policyc.runtime.vision import ImageStages

if TYPE_CHECKING:
    from policyc.runtime.graphs import CapturedGraph

Backend = Literal["eager", "inductor", "fx"]
ACTIVE = "_policyc_active"  # the model's attribute naming the CompiledModel that rewrote it
BACKENDS: tuple[Backend, ...] = ("eager", "inductor", "fx")


class PolicyLayer(LayerWrapper):
    """A decoder layer that sees only the rows still alive, and applies the stages bound to it."""

    def __init__(self, inner: nn.Module, index: int, runtime: Runtime, stages: list[BoundStage]) -> None:
        super().__init__(inner, index)
        self.runtime = runtime
        self.stages = stages

    def forward(self, hidden_states: torch.Tensor, **kwargs: object) -> torch.Tensor:
        state = self.runtime.state
        if state is None:
            return self.inner(hidden_states, **kwargs)
        prefill = hidden_states.shape[1] > 1
        runtime = self.runtime
        if prefill and runtime.graphs and torch.compiler.is_compiling():  # the graph passes do the prefill
            return self.inner(hidden_states, **kwargs)  # (dynamo falling back to eager runs the code below)
        if prefill:
            if self.index == 0:
                hidden_states = runtime.drop_before_llm(hidden_states)
                if runtime.rates_text:
                    runtime.rate_text(hidden_states)
            live = state.live()  # None unless the batch's samples keep different counts (fillers)
            runtime.kept_at_layer[self.index], runtime.live_at_layer[self.index] = state.kept, live
            if state.kept.shape[1] < state.length or live is not None:
                kwargs = gather_prefill(kwargs, state, live)
                if runtime.compact:
                    kwargs = self._renumber(hidden_states, kwargs, compact_positions(state.valid, state.kept, live))
                elif runtime.base_positions is not None:
                    kwargs = self._renumber(hidden_states, kwargs, torch.gather(runtime.base_positions, 1, state.kept))
        else:
            kept = runtime.kept_at_layer.get(self.index)
            shorter = runtime.shorter(self.index)
            hybrid = LINEAR_ATTENTION in runtime.plan.adapter.layer_types
            # transformers sized the mask by the first attention layer's cache (layer 0's; Qwen3.5's first full one)
            if shorter and (runtime.dropped_before is not None or hybrid):
                mask = runtime.full_decode_mask(kwargs.get("attention_mask"), is_static(kwargs))  # type: ignore[arg-type]
                kwargs = {**kwargs, "attention_mask": mask}
            cache = runtime.cache if runtime.cache and runtime.cache.handles(self.index) else None
            window = runtime.window(self.index)
            if runtime.plan.adapter.layer_types and not hybrid and (cache is not None or shorter):
                # transformers sizes one decode mask per layer type by the first cache layer of that type, which may
                # hold fewer keys (Gemma 3): this layer's mask is rebuilt over every original position
                mask = runtime.layer_decode_mask(window, kwargs.get("attention_mask"))  # type: ignore[arg-type]
                kwargs = {**kwargs, "attention_mask": mask}
            if cache is not None:
                kwargs = cache.decode_mask(self.index, kwargs)
            elif shorter:
                kwargs = gather_decode(kwargs, kept, state.length, runtime.live_at_layer.get(self.index),  # type: ignore[arg-type]
                                       runtime.step if runtime.static else runtime.steps)  # type: ignore[arg-type]
                if window is not None:  # its sliding cache holds the last `window` keys of its shorter sequence
                    mask = kwargs["attention_mask"]
                    kwargs = {**kwargs, "attention_mask": mask[..., -min(mask.shape[-1], window):]}  # type: ignore[index]
            dropped = runtime.decode_shift(self.index)
            if dropped is not None:
                position_ids = kwargs["position_ids"]
                kwargs = self._renumber(hidden_states, kwargs, position_ids - dropped[:, None])  # type: ignore[operator]
            if cache is not None:
                kwargs = cache.decode_positions(self.index, hidden_states, kwargs)
        output = self.inner(hidden_states, **kwargs)
        if not prefill and cache is not None:
            cache.after_decode(self.index)
        if prefill and self.stages:
            output = self._apply_stages(output, kwargs)
        return output

    def _renumber(self, hidden: torch.Tensor, kwargs: dict[str, object], positions: torch.Tensor,
                  ) -> dict[str, object]:
        """Rotary embeddings and position ids for renumbered positions (this layer's own, [B, n])."""
        embeddings = self.runtime.plan.adapter.position_embeddings(self.index, hidden, positions)
        return {**kwargs, "position_ids": positions, "position_embeddings": embeddings}

    def _apply_stages(self, hidden: torch.Tensor, kwargs: dict[str, object]) -> torch.Tensor:
        """The stages at this layer; `attention(layer=next)` reads the next layer's rotary embedding (its own
        where layer types differ, as Gemma 3's local and global layers do)."""
        position_embeddings = kwargs["position_embeddings"]  # type: ignore[assignment]
        adapter, following = self.runtime.plan.adapter, self.index + 1
        if following < len(adapter.decoder_layers) and adapter.layer_type(following) != adapter.layer_type(self.index) \
                and LINEAR_ATTENTION not in adapter.layer_types:  # (a hybrid LLM's layers share one rotary)
            position_embeddings = adapter.position_embeddings(following, hidden, kwargs["position_ids"])  # type: ignore[arg-type]
        hidden = self.runtime.apply_stages(self.index, self.stages, hidden, self.runtime.captured.get(self.index),
                                           position_embeddings)  # type: ignore[arg-type]
        self.runtime.stages_ran.add(self.index)
        return hidden


def _reads(plan: Plan, name: str) -> bool:
    """Whether an LLM stage's statements name `name` (a set or score)."""
    return any(isinstance(node, ir.Name) and node.id == name
               for s in plan.stages if s.kind == "llm" for st in s.statements for node in st.walk())


def _previous_layers(plan: Plan) -> set[int]:
    """The LLM layers before stages that read `attention(..., layer=previous)`; such a stage at layer 0 fails."""
    layers = set()
    for stage in plan.stages:
        if stage.kind == "llm" and _reads_in(stage.statements, "previous"):
            if 0 in stage.layers:
                raise PolicyError.at("attention(layer=previous) reads the LLM layer before the stage's, and layer 0 "
                                     "has none", stage.span, "run the stage at layer 1 or later"
                                     ).with_sources(dict(plan.checked.sources))
            layers |= {k - 1 for k in stage.layers}
    return layers


def _reads_in(statements: Sequence[ir.Statement], name: str) -> bool:
    return any(isinstance(node, ir.Name) and node.id == name for st in statements for node in st.walk())


class CompiledModel:
    """A model rewritten by a plan, in place. `remove()` restores the original modules."""

    def __init__(self, plan: Plan, backend: Backend = "eager") -> None:
        check_supported(plan, backend)
        if isinstance(plan.adapter.model.__dict__.get(ACTIVE), CompiledModel):
            raise PolicyError.at("this model is already compiled with a policy: compiling it again would stack two "
                                 "rewrites", None, "call .remove() on the compiled model first (policyc.compile "
                                 "does so itself and replaces the previous policy)")
        self.plan = plan
        self.backend = backend
        modes = {st.mode for s in plan.stages for st in s.statements if isinstance(st, ir.Positions)}
        if plan.adapter.rope == "mrope":  # dropped image tokens leave no gap in M-RoPE positions (qwen2_vl.py)
            modes = set()
        self.runtime = Runtime(plan, compact=bool(modes & {"compact", "cache_length"}),
                               cache_length="cache_length" in modes, rates_text=_reads(plan, "raters"))
        adapter = plan.adapter
        self.model = adapter.model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []
        self._original_attention = adapter.decoder.config._attn_implementation
        self.images = ImageStages(plan)  # pre-LLM stages; .kept/.protected [images, tokens_per_image] after each
        self.images.install()
        stage_layers = sorted({k for s in plan.stages if s.kind == "llm" for k in s.layers})
        before_llm = any(s.kind in ("encoder", "projector") for s in plan.stages)  # drops at the LLM's input
        self._wrapped: list[tuple[int, nn.Module]] = []
        self.graphs: list[CapturedGraph] = []  # the graph backends' rewritten graphs, as captured
        if before_llm:
            self.runtime.images = self.images
        self.runtime.cache = CacheRuntime.build(plan, self.runtime)
        cached = set(self.runtime.cache.layers if self.runtime.cache else ())
        at_input = before_llm or self.runtime.rates_text  # layer 0's wrapper sees the LLM's input embeddings
        previous = _previous_layers(plan)  # layers whose attention a later stage reads (attention(layer=previous))
        wrapped_layers = sorted(set(stage_layers) | previous | cached | ({0} if at_input else set()))
        if backend != "eager":
            # prefill stages become graph passes; decoding stays with the layer wrappers below
            self._compile_graphs(stage_layers, inductor=backend == "inductor")
        if wrapped_layers:
            if stage_layers or cached:
                name = register(self._original_attention or "sdpa")
                adapter.decoder.config._attn_implementation = name
                if self.runtime.cache is not None:
                    adapter.decoder.config._attn_implementation = self.runtime.cache.install() or name
                    self._handles.append(self.model.register_forward_pre_hook(self.runtime.cache.on_forward,
                                                                              with_kwargs=True))
                    self._handles.append(self.model.register_forward_hook(self.runtime.cache.after_forward,
                                                                          with_kwargs=True))
            from policyc.runtime.hybrid import LinearPolicyLayer  # (it subclasses PolicyLayer)

            linear = set(linear_layers(adapter.layer_types))
            for k in range(wrapped_layers[0], len(adapter.decoder_layers)):
                stages = [s for s in plan.stages if s.kind == "llm" and k in s.layers]
                inner = adapter.decoder_layers[k]
                wrapper = LinearPolicyLayer if k in linear else PolicyLayer
                adapter.decoder_layers[k] = wrapper(inner, k, self.runtime, stages)
                self._wrapped.append((k, inner))
                if stages or k in previous:
                    adapter.decoder_attention[k]._policyc_recorder = self._recorder(k)
            self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
            undo = adapter.hook_llm_rows(lambda: self.runtime.state.kept if self.runtime.state is not None else None,
                                         lambda: self.runtime.state.folds if self.runtime.state is not None else ())
            self._undo += [undo] if undo is not None else []  # Qwen3-VL's DeepStack: features of the rows alive
            if adapter.layer_types:  # per-type masks (Gemma 3): the attention signals read them
                self._handles.append(adapter.decoder.register_forward_pre_hook(self._on_decoder, with_kwargs=True))
        self._serialize_generate()
        self.model.__dict__[ACTIVE] = self

    def _serialize_generate(self) -> None:
        """The runtime keeps one request's state (kept rows, positions, cache bookkeeping) from prefill to the
        last decode step, so requests must not interleave: generate() takes a lock for the whole call (threads
        sharing the model wait their turn), and a bare forward() from another thread during one raises."""
        self._request_lock = threading.Lock()
        self._holder: int | None = None
        inner = self.model.generate  # the class's, or a wrapper installed before (vision.py)

        @functools.wraps(inner)
        def generate_one_at_a_time(*args: object, **kwargs: object) -> object:
            with self._request_lock:
                self._holder = threading.get_ident()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self._holder = None

        self._unwrap_generate = replace_attribute(self.model, "generate", generate_one_at_a_time)

    def _compile_graphs(self, stage_layers: list[int], inductor: bool) -> None:
        from policyc.passes.graph import GraphContext
        from policyc.runtime import ops
        from policyc.runtime.graphs import GraphBackend, compile_decoder

        adapter = self.plan.adapter
        handle = ops.register(self.runtime)
        backend = GraphBackend(lambda: GraphContext(handle, type(adapter.decoder_layers[0]), tuple(stage_layers),
                                                    len(adapter.decoder_layers), self.runtime.compact),
                               inductor=inductor, graphs=self.graphs)
        self.runtime.graphs = True
        self._undo += [compile_decoder(adapter.decoder, backend), lambda: ops.unregister(handle)]
        self._handles.append(self.model.register_forward_hook(self._check_stages_ran, with_kwargs=True))

    def _check_stages_ran(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        """After a prefill under the graph backends: every stage ran, in the rewritten graph or (where
        torch.compile fell back to eager) in the layer wrappers; never a silently uncompressed model."""
        state = self.runtime.state
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if state is None or not isinstance(input_ids, torch.Tensor) or input_ids.shape[1] <= 1:
            return
        expected = {k for s in self.plan.stages if s.kind == "llm" for k in s.layers}
        missing = sorted(expected - self.runtime.stages_ran)
        if missing:
            stage = next(s for s in self.plan.stages if s.kind == "llm" and missing[0] in s.layers)
            raise PolicyError.at(f"the {self.backend} backend's prefill did not run the stage at llm.layer"
                                 f"[{missing[0]}]: torch.compile split the decoder graph so the graph pass could "
                                 "not apply", stage.span, "compile with backend='eager'; please report this model",
                                 ).with_sources(dict(self.plan.checked.sources))

    def _recorder(self, index: int):  # type: ignore[no-untyped-def]
        def record(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
            if self.runtime.graphs and torch.compiler.is_compiling():  # the graph passes read q/k in the graph
                return
            self.runtime.captured[index] = Captured(query, key, scaling, self.runtime.model_visible(index))
        return record

    def _on_decoder(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decoder pre-hook: keep a prefill's mask per layer type (Gemma 3's mapping of sliding and global masks)."""
        hidden = kwargs.get("inputs_embeds")
        masks = kwargs.get("attention_mask")
        if isinstance(hidden, torch.Tensor) and hidden.shape[1] > 1:
            self.runtime.layer_masks = dict(masks) if isinstance(masks, dict) else None

    @torch.compiler.disable  # per-call bookkeeping (a step counter, a thread check) stays out of compiled decode steps
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        holder = self._holder
        if holder is not None and holder != threading.get_ident():
            raise PolicyError.at("this compiled model is inside a generate() call of another thread: its runtime "
                                 "holds that request's state until the call returns", None,
                                 "use generate() from every thread (calls are serialized), or compile one model "
                                 "per thread")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(input_ids, torch.Tensor):
            raise PolicyError.at("the compiled model needs input_ids (image positions are read from them)", None)
        self.runtime.static = is_static(kwargs)
        if input_ids.shape[1] > 1:  # prefill: a new prompt
            self._whole_sequence_caches(kwargs)
            self.runtime.start_prefill(input_ids, kwargs.get("attention_mask"))
        else:
            self.runtime.advance()

    def _whole_sequence_caches(self, kwargs: dict) -> None:
        """Sliding-window cache layers (Gemma 3's local layers) keep only the last window of keys, which per-head
        evictions cannot map back to positions: before a prefill fills the cache, those a cache policy handles
        become whole-sequence layers (their window then acts through the mask, `Runtime.window_decode_mask`)."""
        from transformers.cache_utils import DynamicLayer

        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        layers = getattr(cache, "layers", None)
        if not layers or not any(getattr(layer, "is_sliding", False) for layer in layers):
            return
        span = next((s.span for s in self.plan.stages if s.kind in ("llm", "decode")), None)
        if self.runtime.static:
            raise PolicyError.at("a static cache with sliding-window layers is not supported by policyc's runtime",
                                 span, "drop cache_implementation=\"static\" from generate()",
                                 ).with_sources(dict(self.plan.checked.sources))
        handled = self.runtime.cache.layers if self.runtime.cache is not None else []
        for index in handled:
            if getattr(layers[index], "is_sliding", False):
                if layers[index].get_seq_length() > 0:
                    raise PolicyError.at("a prefill continuing a cache with sliding-window layers is not supported "
                                         "by policyc's cache policies", span, "start generate() from an empty cache",
                                         ).with_sources(dict(self.plan.checked.sources))
                layers[index] = DynamicLayer()

    def remove(self) -> None:
        """Undo the rewrite: original layers, attention function and hooks."""
        adapter = self.plan.adapter
        if self.model.__dict__.get(ACTIVE) is self:
            del self.model.__dict__[ACTIVE]
        if self._unwrap_generate is not None:
            self._unwrap_generate()  # first: it is the outermost generate() wrapper
            self._unwrap_generate = None
        self.images.remove()
        for index, inner in self._wrapped:
            adapter.decoder_layers[index] = inner
            if hasattr(adapter.decoder_attention[index], "_policyc_recorder"):
                del adapter.decoder_attention[index]._policyc_recorder
        adapter.decoder.config._attn_implementation = self._original_attention
        if self.runtime.cache is not None:
            self.runtime.cache.remove()
        for handle in self._handles:
            handle.remove()
        for undo in self._undo:
            undo()
        self._wrapped.clear()
        self._handles.clear()
        self._undo.clear()

    @property
    def kept_positions(self) -> torch.Tensor | None:
        """Original prompt positions alive after the last prefill, per sample: [B, n] (None before one).
        Where samples kept different counts, the rows `runtime.state.live()` marks False are fillers."""
        return self.runtime.state.kept if self.runtime.state is not None else None

    def __getattr__(self, name: str) -> object:
        return getattr(self.model, name)


__all__ = ["BACKENDS", "Backend", "CompiledModel", "ImageSource", "PolicyLayer", "Runtime"]
