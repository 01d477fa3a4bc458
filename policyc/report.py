"""The compile report: where a policy's stages run, how many image tokens each keeps, and what prefill
costs before and after, as analytic FLOPs.

FLOPs are counted, not timed: 2 per multiply-add of every linear layer (from the layer's weight
shapes, which the config determines) plus attention scores (`QKᵀ` and `AV`, 2·n²·H·d each, dense,
as SDPA computes them), per vision-encoder layer, the projector and per LLM decoder layer, for the
tokens each layer actually processes. Embeddings, norms, rotary, softmax, the LM head and the cost
of a policy's own scoring are left out. The expected prefill speedup is the FLOPs ratio; real
speedups depend on the hardware and kernels (`policyc run` times them).

Tokens kept are measured on one forward pass of a sample input (`measure`): the runtime records,
per LLM layer, the original prompt positions that layer processed (`compiled.runtime.kept_at_layer`).
Stages before the LLM (encoder, projector) report, together, the image tokens they hand to the LLM;
the encoder's and projector's FLOPs are counted at full size (their internal shrinking is not yet
measured).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from policyc import terminal
from policyc.models.base import ModelAdapter
from policyc.models.structure import linear_layers

NOTE = ("analytic prefill FLOPs (linear layers + attention scores of the vision encoder, projector and LLM "
        "decoder layers); the speedup is their ratio, not a timing")


@dataclass(frozen=True)
class StageTokens:
    """Image tokens around one stage at one layer (sample 0 of the batch).

    `kept_patches` are patch indices (row-major over the encoder's patch grid) whose tokens are still
    alive after the stage; `kept_tokens` are the indices, among the row's visual tokens in prompt order
    (every image, tile, crop, newline and CLS token), of those alive after it (`--show-tokens` draws
    them through `ModelAdapter.image_layouts`); `merged` maps a merged-away visual token to the token it
    went into, indexed as `kept_tokens` (empty until the runtime merges). `cls_kept` says whether a CLS
    token (strategy "full") survives.
    """

    label: str
    point: str
    layer: int | None
    before: int
    after: int
    kept_patches: tuple[int, ...]
    merged: Mapping[int, int] = field(default_factory=dict)
    cls_kept: bool = False
    kept_tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class Flops:
    """Prefill FLOPs of one forward pass, split by part of the model."""

    encoder: int
    projector: int
    llm: int

    @property
    def total(self) -> int:
        return self.encoder + self.projector + self.llm


def _linear_macs(module: nn.Module, experts_per_token: int = 1) -> int:
    """Multiply-adds per token of every `nn.Linear` inside `module` (sum of in x out), and of fused MoE experts
    (Qwen3-VL-MoE: 3-D weights [experts, out, in], `experts_per_token` of them per token, plus the router's
    [experts, in] weight in the module choosing them, which has a `top_k`)."""
    macs = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    for m in module.modules():
        for weight in m.parameters(recurse=False):
            if weight.dim() == 3:
                macs += experts_per_token * weight.shape[1] * weight.shape[2]
            elif weight.dim() == 2 and hasattr(m, "top_k") and not isinstance(m, nn.Linear):
                macs += weight.numel()
    return macs


def layer_flops(tokens: int, linear_macs: int, heads: int, head_dim: int, attention: bool = True) -> int:
    """One transformer layer on `tokens` rows: its linear layers plus dense attention scores (`attention`; a
    linear-attention layer has none: its recurrence is in `linear_macs`, per row)."""
    return 2 * tokens * linear_macs + (4 * tokens * tokens * heads * head_dim if attention else 0)


def _recurrence_macs(text_config: Any) -> int:
    """Per row, the state work of a Gated DeltaNet layer (Qwen3.5, arXiv:2412.06464): the delta-rule update of each
    value head's [key_dim, value_dim] state and its read-out by the query."""
    heads = getattr(text_config, "linear_num_value_heads", 0) or 0
    return 2 * heads * (getattr(text_config, "linear_key_head_dim", 0) or 0) * \
        (getattr(text_config, "linear_value_head_dim", 0) or 0)


def prefill_flops(adapter: ModelAdapter, llm_tokens: list[int], batch: int = 1,
                  encoder_tokens: list[list[int]] | None = None, projector_tokens: int | None = None,
                  images: int | list[int] = 1) -> Flops:
    """Analytic FLOPs of a prefill whose LLM layer k processes `llm_tokens[k]` rows per sample.

    `images` is an image count at the model's fixed size, or each image's LLM tokens (sizes vary on
    Qwen2-VL); `encoder_tokens` (per image, per encoder layer: the rows it ran on) defaults to those
    images in full; `projector_tokens` to their full slots.
    """
    sizes = [adapter.tokens_per_image or 0] * images if isinstance(images, int) else images
    if encoder_tokens is None:
        encoder_tokens = [[adapter.encoder_tokens(n)] * len(adapter.vision_layers) for n in sizes]
    projector_tokens = sum(sizes) if projector_tokens is None else projector_tokens
    encoder = sum(layer_flops(n, _linear_macs(layer), adapter.vision_num_heads, adapter.vision_head_dim)
                  for per_image in encoder_tokens
                  for layer, n in zip(adapter.vision_layers, per_image, strict=True))
    text_config = getattr(adapter.model.config, "text_config", adapter.model.config)
    experts = getattr(text_config, "num_experts_per_tok", None) or 1  # MoE: the experts each token runs through
    linear = set(linear_layers(adapter.layer_types))  # linear-attention layers: a recurrence, no pairwise scores
    recurrence = _recurrence_macs(text_config) if linear else 0
    llm = sum(layer_flops(n, _linear_macs(layer, experts) + (recurrence if k in linear else 0), adapter.num_heads,
                          adapter.head_dim, k not in linear)
              for k, (layer, n) in enumerate(zip(adapter.decoder_layers, llm_tokens, strict=True)))
    return Flops(batch * encoder, batch * 2 * projector_tokens * _linear_macs(adapter.projector),
                 batch * llm)


@dataclass
class Report:
    """The compile report (`report.json` in an artifact)."""

    policy: str
    model: str
    prompt_tokens: int  # tokens of the reported row (padding excluded when an attention mask was given)
    image_tokens: int  # image tokens the LLM sees in sample 0
    batch: int
    stages: list[dict[str, Any]]  # label, point, kind, layers
    hook_points: list[str]
    kept: list[StageTokens]
    llm_tokens_per_layer: list[int]
    flops_before: Flops
    flops_after: Flops
    calibration: str = "measured on this prompt"

    @property
    def speedup(self) -> float:
        return self.flops_before.total / self.flops_after.total

    @property
    def kv_share(self) -> float:
        """KV cache entries prefill leaves, summed over layers, over the unmodified model's (all prompt tokens
        at every layer): the KV memory share after prefill (decode-time eviction not included)."""
        layers = len(self.llm_tokens_per_layer)
        return sum(self.llm_tokens_per_layer) / (layers * self.prompt_tokens) if layers and self.prompt_tokens else 1.0

    def to_json(self) -> dict[str, Any]:
        def flops(f: Flops) -> dict[str, int]:
            return {"encoder": f.encoder, "projector": f.projector, "llm": f.llm, "total": f.total}

        return {
            "policy": self.policy, "model": self.model, "calibration": self.calibration,
            "prompt_tokens": self.prompt_tokens, "image_tokens": self.image_tokens, "batch": self.batch,
            "stages": self.stages, "hook_points": self.hook_points,
            "kept": [{**asdict(k), "kept_patches": list(k.kept_patches), "kept_tokens": list(k.kept_tokens),
                      "merged": {str(a): b for a, b in k.merged.items()}} for k in self.kept],
            "llm_tokens_per_layer": self.llm_tokens_per_layer,
            "flops": {"before": flops(self.flops_before), "after": flops(self.flops_after)},
            "expected_prefill_speedup": round(self.speedup, 4), "note": NOTE,
        }

    def render(self, console: Console | None = None) -> None:
        console = console or terminal.console()
        kept = Table("stage", "hook", "layer", "image tokens in", "kept", "share",
                     title=f"tokens kept per stage (policy {escape(self.policy)}, {self.calibration})",
                     title_justify="left")
        for k in self.kept:
            share = f"{k.after / k.before:.0%}" if k.before else "-"
            kept.add_row(escape(k.label), k.point, "" if k.layer is None else str(k.layer), str(k.before),
                         str(k.after), share)
        if not self.kept:
            kept.add_row("(no stage changes tokens)", "", "", str(self.image_tokens), str(self.image_tokens), "100%")
        console.print(kept)
        cost = Table("prefill part", "GFLOPs before", "GFLOPs after", title="analytic prefill cost",
                     title_justify="left")
        for part in ("encoder", "projector", "llm", "total"):
            cost.add_row(part, f"{getattr(self.flops_before, part) / 1e9:.4f}",
                         f"{getattr(self.flops_after, part) / 1e9:.4f}")
        console.print(cost)
        console.print(f"expected prefill speedup: [bold]{self.speedup:.2f}x[/bold] [dim]({NOTE})[/dim]")


def _stage_tokens(label: str, point: str, layer: int | None, before: int, adapter: ModelAdapter,
                  image_slots: torch.Tensor, alive: torch.Tensor) -> StageTokens:
    """The `StageTokens` of the image tokens at `image_slots` that are `alive` after a stage.

    Patches: the LLM's image tokens are the encoder tokens from `feature_start` on, in order: CLS first
    when the features keep it, then the patches row-major (one image's grid).
    """
    kept = torch.nonzero(alive[image_slots]).flatten()
    patch = kept + adapter.feature_start - int(adapter.has_cls)
    return StageTokens(label, point, layer, before, len(kept), tuple(int(p) for p in patch if p >= 0), {},
                       bool((patch < 0).any()), tuple(int(t) for t in kept))


def measure(compiled: Any, inputs: Mapping[str, torch.Tensor], model_name: str,
            calibration: str = "measured on this prompt") -> Report:
    """Run one prefill forward of `compiled` on `inputs` (no generation) and build the report."""
    with torch.no_grad():
        compiled.model(**inputs, use_cache=False)
    return report_from_last_prefill(compiled, inputs["input_ids"], model_name, calibration)


def report_from_last_prefill(compiled: Any, input_ids: torch.Tensor, model_name: str,
                             calibration: str = "measured on this prompt", row: int = 0,
                             attention_mask: torch.Tensor | None = None) -> Report:
    """The report of the prefill `compiled` ran last on `input_ids` (e.g. inside `generate()`), for the
    batch's `row`; with `attention_mask`, padding counts as neither prompt tokens nor FLOPs."""
    plan, runtime = compiled.plan, compiled.runtime
    adapter: ModelAdapter = plan.adapter
    batch, length = input_ids.shape
    image = adapter.visual_mask(input_ids[row]).to(torch.device("cpu"))
    real = torch.ones(length, dtype=torch.bool) if attention_mask is None else attention_mask[row].bool().cpu()
    image_slots = torch.nonzero(image).flatten()
    layers = len(adapter.decoder_layers)

    def rows(k: int) -> torch.Tensor:
        """Original positions of `row` that layer k processes, fillers left out (rows a sample keeping fewer tokens
        than the batch's widest carries on, masked); after the last layer, what prefill kept."""
        if k < layers and k in runtime.kept_at_layer:
            kept, live = runtime.kept_at_layer[k][row], runtime.live_at_layer.get(k)
        elif k >= layers and compiled.kept_positions is not None:
            kept, live = compiled.kept_positions[row], runtime.state.live()
        else:
            return torch.arange(length)
        return (kept if live is None else kept[live[row]]).cpu()

    def alive_at(k: int) -> torch.Tensor:
        return torch.zeros(length, dtype=torch.bool).scatter(0, rows(k), True)

    kept: list[StageTokens] = []
    before_llm = [s for s in plan.stages if s.kind in ("encoder", "projector")]
    if before_llm:  # together, as the LLM receives them: what the stages before it left of sample 0's images
        kept.append(_stage_tokens(" + ".join(s.label for s in before_llm), before_llm[-1].point, None,
                                  int(image.sum()), adapter, image_slots, alive_at(0)))
    for stage in plan.stages:
        if stage.kind != "llm":
            continue
        for k in stage.layers:
            kept.append(_stage_tokens(stage.label, stage.point, k, int((alive_at(k) & image).sum()), adapter,
                                      image_slots, alive_at(k + 1)))
    per_layer = [int((alive_at(k) & real).sum()) for k in range(layers)]
    sizes = adapter.image_sizes(input_ids[row])
    first = sum(len(adapter.image_sizes(earlier)) for earlier in input_ids[:row])
    images = len(sizes)
    encoder_rows = getattr(getattr(compiled, "images", None), "encoder_rows", None)  # pre-LLM stages shrink
    encoder_after = None if encoder_rows is None or encoder_rows.shape[0] < first + images else \
        encoder_rows[first:first + images].tolist()
    stages = [{"label": s.label, "point": s.point, "kind": s.kind, "layers": list(s.layers)} for s in plan.stages]
    return Report(
        policy=plan.name, model=model_name, prompt_tokens=int(real.sum()), image_tokens=int(image.sum()),
        batch=batch, stages=stages, hook_points=sorted({s.point for s in plan.stages}), kept=kept,
        llm_tokens_per_layer=per_layer,
        flops_before=prefill_flops(adapter, [int(real.sum())] * layers, batch, images=sizes),
        flops_after=prefill_flops(adapter, per_layer, batch, encoder_after, images=sizes), calibration=calibration,
    )


def calibration_inputs(adapter: ModelAdapter, text_tokens: int = 16) -> dict[str, torch.Tensor]:
    """A model-agnostic sample prompt around the example image (`ModelAdapter.sample_inputs`)."""
    return adapter.sample_inputs(text_tokens)


__all__ = ["NOTE", "Flops", "Report", "StageTokens", "calibration_inputs", "layer_flops", "measure", "prefill_flops",
           "report_from_last_prefill"]
