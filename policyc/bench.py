"""Timing machinery of `policyc bench`: synthetic inputs, timed calls, the ideal row's token-count hooks, and
the figures of one row (prefill latency, time to first token, decode tokens/s, peak memory, KV cache bytes).

Times are medians of `repeats` runs after `warmup` runs, with CUDA synchronized around each; peak memory is
`torch.cuda.max_memory_allocated` around the call (reset before it) and None off CUDA. Nothing here asserts
anything about speed: the command prints figures.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from policyc.errors import PolicyError
from policyc.models.base import ModelAdapter, placement, text_around


@dataclass(frozen=True)
class Settings:
    """What `policyc bench` measures: the synthetic inputs' shape and how to time them."""

    batch: int = 8
    images: int = 1
    prompt_len: int = 64  # text tokens around the image tokens
    gen_len: int = 32  # new tokens for the decode figure (t(gen_len) - t(1))
    backend: str = "eager"
    dtype: str = "bfloat16"
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 5
    seed: int = 0
    kernels: str = "auto"  # policyc's kernels: fused by torch.compile (on), eager (off), fused on CUDA only (auto)
    cache: str = "dynamic"  # generate()'s KV cache; "static": on CUDA, transformers compiles decode steps (CUDA graphs)
    # torch.compile mode of every row's whole forward ("none": not compiled; "reduce-overhead": CUDA graphs on CUDA)
    compile: str = "none"

    @property
    def generate_options(self) -> dict[str, Any]:
        """generate() keyword arguments these settings add (the cache implementation)."""
        return {"cache_implementation": "static"} if self.cache == "static" else {}


@dataclass
class Row:
    """The figures of one row of the table (seconds, bytes; None where the row has no such figure)."""

    name: str
    note: str = ""
    prefill_s: float | None = None
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    peak_prefill_bytes: int | None = None
    peak_generate_bytes: int | None = None
    kv_bytes: int | None = None
    image_tokens: float | None = None  # mean over the batch, at the last LLM layer
    tokens_per_layer: list[int] = field(default_factory=list)  # rows each LLM layer processed in prefill
    flops_share: float | None = None  # analytic prefill FLOPs over the unmodified model's
    recompiles: int | None = None  # graphs torch._dynamo compiled during the timed runs (inductor; after warmup)
    # --compile reduce-overhead: compiled graphs inductor left without CUDA graphs (its cudagraph_skips counter)
    cudagraph_skips: int | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # e.g. prefill_vs_unmodified

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


QWEN_IMAGE_TOKENS = 576  # per synthetic Qwen-VL image: 48 x 48 patches merged 2 x 2 (672 px at 14 px), LLaVA-1.5's


def _repeated_sample(adapter: ModelAdapter, settings: Settings) -> dict[str, torch.Tensor]:
    """The adapter's calibration prompt (one image) with `prompt_len` text tokens, `batch` times: every input's
    first dimension (prompts, or images and their patches) repeated."""
    if settings.images != 1:
        raise PolicyError.at(f"--images {settings.images}: policyc bench builds {adapter.family} prompts from its "
                             "calibration prompt, which holds one image", None, "bench with --images 1")
    sample = adapter.sample_inputs(settings.prompt_len)
    return {name: torch.cat([value] * settings.batch) for name, value in sample.items()}


def synthetic_inputs(adapter: ModelAdapter, settings: Settings) -> dict[str, torch.Tensor]:
    """`batch` identical prompts of `prompt_len` text tokens (ordinary ids, repeated where the vocabulary is small)
    around `images` images' tokens (adjacent, in the middle), and random pixel values: [batch * images, 3, H, W] at
    the encoder's size for LLaVA-style models; Qwen-VL-style ones (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) as their
    processor gives them, each image `<vision_start>`, `QWEN_IMAGE_TOKENS` image tokens and `<vision_end>`, its
    flattened patches in `pixel_values`, its grid in `image_grid_thw` and `mm_token_type_ids` marking image tokens.
    Other families: their adapter's calibration prompt (one image: the example scene) with `prompt_len` text
    tokens, repeated `batch` times."""
    config = adapter.model.config
    qwen = adapter.family != "llava" and hasattr(config, "vision_start_token_id") and \
        hasattr(config.vision_config, "temporal_patch_size")
    if adapter.family != "llava" and not qwen:
        return _repeated_sample(adapter, settings)
    if adapter.tokens_per_image is None and not qwen:
        raise PolicyError.at("policyc bench needs a fixed number of tokens per image on this LLaVA model", None)
    ordinary = text_around(adapter, settings.prompt_len, [])  # distinct ordinary ids, as many as there are
    if not ordinary:
        raise PolicyError.at("this model's vocabulary has no ordinary text ids to build a prompt from", None)
    text = [ordinary[k % len(ordinary)] for k in range(settings.prompt_len)]  # small vocabularies repeat ids
    half = len(text) // 2
    device, dtype = placement(adapter.model)
    generator = torch.Generator().manual_seed(settings.seed)
    if qwen:
        vision = config.vision_config
        side = vision.spatial_merge_size * round(QWEN_IMAGE_TOKENS ** 0.5)  # patches per side
        image = [config.vision_start_token_id, *[adapter.image_token_id] * QWEN_IMAGE_TOKENS,
                 config.vision_end_token_id]
        input_ids = torch.tensor([text[:half] + image * settings.images + text[half:]] * settings.batch, device=device)
        images = settings.batch * settings.images
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        pixels = torch.randn(images * side * side, patch, generator=generator)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                "mm_token_type_ids": (input_ids == adapter.image_token_id).long(),
                "pixel_values": pixels.to(device=device, dtype=dtype),
                "image_grid_thw": torch.tensor([[1, side, side]] * images, device=device)}
    row = text[:half] + [adapter.image_token_id] * adapter.tokens_per_image * settings.images + text[half:]
    size = config.vision_config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    pixels = torch.randn(settings.batch * settings.images, 3, height, width, generator=generator)
    input_ids = torch.tensor([row] * settings.batch, device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels.to(device=device, dtype=dtype)}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int,
          ) -> tuple[float, int | None, Any, int]:
    """Median seconds of `repeats` calls after `warmup` untimed ones, the peak CUDA memory over the timed calls
    (None off CUDA), the last call's result, and the graphs torch._dynamo compiled during the timed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            call()
        times, peak, result, graphs = [], None, None, dynamo_graphs()
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            result = call()
            synchronize(device)
            times.append(time.perf_counter() - start)
            if device.type == "cuda":
                peak = max(peak or 0, torch.cuda.max_memory_allocated(device))
    return statistics.median(times), peak, result, dynamo_graphs() - graphs


def generate(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, **extra: Any) -> Any:
    """Greedy generate() of exactly `new_tokens` tokens (no early stop at EOS)."""
    return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **extra)


def prefill(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """One forward over the prompt with its pixel values (encoder, projector, LLM), last position's logits only."""
    return model(**inputs, use_cache=False, logits_to_keep=1)


def kv_bytes(cache: Any) -> int:
    """Bytes of the key and value tensors a generate() left in its cache (every layer); a layer with `kv_tensors()`
    (a quantized cache: codes, scales, offsets and its full-precision residual) counts those."""
    layers = getattr(cache, "layers", None)
    if layers is None:  # legacy tuples of (key, value) per layer
        return sum(t.numel() * t.element_size() for pair in cache for t in pair if isinstance(t, torch.Tensor))
    return sum(t.numel() * t.element_size() for layer in layers
               for t in (layer.kv_tensors() if hasattr(layer, "kv_tensors") else
                         (getattr(layer, "keys", None), getattr(layer, "values", None)))
               if isinstance(t, torch.Tensor))


def dynamo_graphs() -> int:
    """Graphs torch._dynamo compiled so far (`counters["stats"]["unique_graphs"]`): counted over the timed runs,
    after the warmup compiled each shape once, every new graph is a recompilation (a guard failed)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def measure(row: Row, model: Any, inputs: dict[str, torch.Tensor], settings: Settings, *,
            prefill_only: bool = False) -> Row:
    """Fill `row` with `model`'s prefill latency and TTFT, and (unless `prefill_only`) its decode rate and the
    bytes of the KV cache a generate() of `gen_len` tokens leaves.

    Decode tokens/s is batch x (gen_len - 1) over the time from the first token's logits to the last's inside
    one generate() (stamped by a logits processor, CUDA synchronized), median over the timed runs: the
    difference t(gen_len) - t(1) of two separate medians, with its prefill noise, cannot go negative this way."""
    device = inputs["input_ids"].device
    batch = inputs["input_ids"].shape[0]
    row.prefill_s, row.peak_prefill_bytes, _, graphs = timed(lambda: prefill(model, inputs), device, settings.warmup,
                                                             settings.repeats)
    options = settings.generate_options
    row.ttft_s, _, _, more = timed(lambda: generate(model, inputs, 1, **options), device, settings.warmup,
                                   settings.repeats)
    graphs += more
    if not prefill_only and settings.gen_len > 1:
        from transformers import LogitsProcessorList

        spans: list[float] = []

        def decode() -> None:
            stamps = DecodeClock(device)
            generate(model, inputs, settings.gen_len, logits_processor=LogitsProcessorList([stamps]), **options)
            spans.append(stamps.times[-1] - stamps.times[0])

        _, row.peak_generate_bytes, _, more = timed(decode, device, settings.warmup, settings.repeats)
        graphs += more
        span = statistics.median(spans[settings.warmup:])
        row.decode_tokens_per_s = batch * (settings.gen_len - 1) / span if span > 0 else None
    if settings.backend != "eager" or settings.compile != "none" or (settings.cache == "static"
                                                                    and device.type == "cuda"):
        row.recompiles = graphs  # torch.compile ran: policyc's graph backends, --compile, transformers' compiled decode
    if not prefill_only:
        with torch.no_grad():
            output = generate(model, inputs, max(settings.gen_len, 1), return_dict_in_generate=True, **options)
        cache = output.get("cache")  # transformers >= 5.2x; `past_key_values` before
        row.kv_bytes = kv_bytes(cache if cache is not None else output.past_key_values)
    return row


class DecodeClock:
    """A logits processor that stamps the time each step's logits arrive (after a CUDA synchronize)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        synchronize(self.device)
        self.times.append(time.perf_counter())
        return scores


def _slice_rows(value: Any, length: int, count: int) -> Any:
    """`value` cut to its first `count` of `length` sequence rows (a view): hidden states and rotary tables
    [B, L, ...], position ids [..., L], masks [B, H, L, L] and cache positions [L]."""
    if isinstance(value, tuple):
        return tuple(_slice_rows(v, length, count) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.dim() >= 4 and value.shape[-1] == length and value.shape[-2] == length:
        return value[..., :count, :count]
    if value.dim() >= 3 and value.shape[1] == length:
        return value[:, :count]
    if value.shape[-1] == length:
        return value[..., :count]
    return value


@contextmanager
def ideal_counts(adapter: ModelAdapter, counts: list[int]) -> Iterator[list[int]]:
    """Forward pre-hooks that feed decoder layer k only the first `counts[k]` rows of a prefill (hidden states,
    rotary tables, position ids, mask): the unmodified layers at the policy's token counts, with no scoring or
    selection (Qwen3-VL: the DeepStack features of those rows). Yields the rows each layer actually received in the
    last prefill."""
    layers = adapter.decoder_layers
    seen = [0] * len(layers)
    prompt = [0]  # the prompt's full length, as layer 0 receives it (later layers may get cut hidden states)
    rows: list[torch.Tensor | None] = [None]  # the prefill rows the last layer received, [B, count]

    def hook(index: int) -> Callable[..., tuple[tuple, dict]]:
        def cut(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == 1:  # decoding: unchanged
                return args, kwargs
            if index == 0:
                prompt[0] = hidden.shape[1]
            positions = kwargs.get("position_ids")  # None in Qwen-VL's layers: their rotary tables carry positions
            length = positions.shape[-1] if isinstance(positions, torch.Tensor) else prompt[0]
            count = seen[index] = min(counts[index], hidden.shape[1])
            rows[0] = torch.arange(count, device=hidden.device).expand(hidden.shape[0], -1)
            args = tuple(_slice_rows(a, a.shape[1], count) if a is hidden else _slice_rows(a, length, count)
                         for a in args)
            kwargs = {k: _slice_rows(v, v.shape[1], count) if v is hidden else _slice_rows(v, length, count)
                      for k, v in kwargs.items()}
            return args, kwargs
        return cut

    handles = [layer.register_forward_pre_hook(hook(k), with_kwargs=True) for k, layer in enumerate(layers)]
    undo = adapter.hook_llm_rows(lambda: rows[0])
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        if undo is not None:
            undo()


@contextmanager
def compiled_decoder(adapter: ModelAdapter, backend: str) -> Iterator[None]:
    """The LLM decoder's forward through torch.compile (dynamic shapes) for the ideal row, as policyc's graph
    backends compile it: inductor under `inductor`, dynamo's eager backend under `fx` (graphs, no codegen)."""
    if backend == "eager":
        yield
        return
    from policyc.runtime.patching import replace_attribute

    decoder = adapter.decoder
    compiler = "inductor" if backend == "inductor" else "eager"
    undo = replace_attribute(decoder, "forward", torch.compile(decoder.forward, dynamic=True, backend=compiler))
    try:
        yield
    finally:
        undo()


COMPILER = "inductor"  # the torch.compile backend of --compile (its modes are inductor's)


@contextmanager
def compiled_forward(model: nn.Module, mode: str, row: Row | None = None) -> Iterator[None]:
    """`model`'s whole forward (vision tower, projector, LLM) through torch.compile in `mode` ("none": as it is),
    as a user would wrap a model: under "reduce-overhead" inductor records CUDA graphs of the pieces between graph
    breaks (a policy's host-side counts break the graph). On leaving, dynamo's caches are reset (the next row's model
    is traced afresh, never over the recompile limit) and `row.cudagraph_skips` gets the compiled graphs inductor
    ran without CUDA graphs (their reasons are in its log)."""
    if mode == "none":
        yield
        return
    from torch._dynamo.utils import counters

    from policyc.runtime.patching import replace_attribute

    compiled = torch.compile(model.forward, mode=mode) if COMPILER == "inductor" else \
        torch.compile(model.forward, backend=COMPILER)
    skips = counters["inductor"]["cudagraph_skips"]
    undo = replace_attribute(model, "forward", compiled)
    try:
        yield
    finally:
        undo()
        torch._dynamo.reset()
        if row is not None and mode == "reduce-overhead":
            row.cudagraph_skips = counters["inductor"]["cudagraph_skips"] - skips


def image_tokens_at_last_layer(compiled: Any, input_ids: torch.Tensor) -> float:
    """Mean over the batch of the image tokens the policy's last LLM layer processed in the last prefill
    (filler rows of samples that kept fewer excluded)."""
    runtime, adapter = compiled.runtime, compiled.plan.adapter
    last = len(adapter.decoder_layers) - 1
    visual = adapter.visual_mask(input_ids)
    kept = runtime.kept_at_layer.get(last)
    if kept is None:
        return float(visual.sum(1).float().mean())
    alive = torch.gather(visual, 1, kept.to(visual.device))
    live = runtime.live_at_layer.get(last)
    if live is not None:
        alive = alive & live.to(alive.device)
    return float(alive.sum(1).float().mean())


def policy_counts(compiled: Any, length: int) -> list[int]:
    """Rows each LLM layer processed in the policy's last prefill (fillers included: the layer ran on them)."""
    kept = compiled.runtime.kept_at_layer
    return [int(kept[k].shape[1]) if k in kept else length for k in range(len(compiled.plan.adapter.decoder_layers))]


__all__ = ["Row", "Settings", "compiled_decoder", "compiled_forward", "generate", "ideal_counts",
           "image_tokens_at_last_layer", "kv_bytes", "measure", "policy_counts", "prefill", "synthetic_inputs",
           "timed", "torch_dtype"]
