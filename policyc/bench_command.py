"""`policyc bench [MODEL] POLICY`: prefill latency, time to first token, decode tokens/s, peak memory and KV cache
size of four rows on the same synthetic inputs, printed as a table and written as JSON.

- unmodified: the model as loaded (eager modules, SDPA).
- ideal: the unmodified model's decoder layers fed exactly the token counts the policy leaves at each LLM layer
  (measured from the policy's prefill), by views of the first rows and no scoring or selection work; on the
  policy's backend (torch.compile'd under --backend inductor). Prefill and TTFT only.
- policy: POLICY compiled onto the model by policyc on --backend.
- reference: the plain reference implementation from tests/reference (source checkouts only), prefill/TTFT only.
"""

from __future__ import annotations

import dataclasses
import datetime
import platform
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from policyc import terminal
from policyc.bench import (
    Row,
    Settings,
    compiled_decoder,
    compiled_forward,
    ideal_counts,
    image_tokens_at_last_layer,
    measure,
    policy_counts,
    timed,
    torch_dtype,
)
from policyc.errors import PolicyError
from policyc.lang import ir


def load_bench_model(model: str | None, shapes: str | None, settings: Settings) -> tuple[Any, str]:
    """The model to measure and how the JSON names it: a MODEL reference, or a --shapes architecture."""
    from policyc.models.bundled import DEFAULT_NAME, load_reference_model, reference_name

    dtype = torch_dtype(settings.dtype)
    if shapes is not None:
        if model is not None:
            raise PolicyError.at(f"--shapes {shapes} builds its own model: MODEL ('{model}') cannot be given too",
                                 None, f"policyc bench --shapes {shapes} POLICY")
        from policyc.models.shapes import build_shape

        return build_shape(shapes, settings.device, dtype), f"shapes:{shapes} (random weights)"
    reference = DEFAULT_NAME if model is None else reference_name(model)
    loaded = load_reference_model(reference, settings.device)
    return loaded.to(dtype=dtype).eval(), reference


def bench_command(model: str | None, policy: str, *, settings: Settings, shapes: str | None = None,
                  assignments: dict[str, ir.Expr] | None = None, json_path: Path | None = None,
                  no_reference: bool = False, console: Console | None = None,
                  preloaded: tuple[Any, str] | None = None,
                  unmodified_rows: dict[Settings, Row] | None = None) -> dict[str, Any]:
    """Measure the four rows, print the table, write `json_path`; returns what the JSON holds. `preloaded` is a
    model already built (and its name), e.g. one --shapes model shared by a benchmark matrix, and
    `unmodified_rows` the unmodified rows it measured so far: the row does not depend on the policy, the backend or
    the kernels, so one is measured per other setting and reused."""
    from policyc.bench_reference import eager_once, references, run_reference, unavailable
    from policyc.kernels import fused_on, set_fusion
    from policyc.models import adapt
    from policyc.report import report_from_last_prefill
    from policyc.runtime import compile_model
    from policyc.show import find_one_policy

    console = console or terminal.console(json_path)
    set_fusion(settings.kernels)  # type: ignore[arg-type]
    checked = find_one_policy(policy)
    loaded, model_name = preloaded or load_bench_model(model, shapes, settings)
    adapter = adapt(loaded)
    from policyc.bench import synthetic_inputs

    inputs = synthetic_inputs(adapter, settings)
    length = inputs["input_ids"].shape[1]
    device = inputs["input_ids"].device
    # Under --compile: prefill and TTFT only (a growing cache would recompile every decode step; decode figures
    # come from --cache static, transformers' own compiled decode).
    prefill_only = settings.compile != "none"
    if prefill_only and settings.backend != "eager":
        raise PolicyError.at(f"--compile {settings.compile} wraps each row's whole model in torch.compile; the "
                             f"{settings.backend} backend compiles the LLM itself", None,
                             f"--backend eager --compile {settings.compile} (torch.compile traces the policy's code)")
    compiled_note = f", whole forward torch.compile'd (mode {settings.compile})" if prefill_only else ""
    only = "; prefill and TTFT only" if prefill_only else ""

    if settings.cache == "static":  # refused by cache policies that need a growing cache: before measuring anything
        probe = compile_model(loaded, checked, assignments or {}, settings.backend)  # type: ignore[arg-type]
        probe.remove()
        error = probe.runtime.cache.static_cache_error() if probe.runtime.cache is not None else None
        if error is not None:
            raise error
    unmodified_rows = {} if unmodified_rows is None else unmodified_rows
    key = dataclasses.replace(settings, backend="eager", kernels="auto")
    if key not in unmodified_rows:
        unmodified_rows[key] = Row("unmodified", "the model as loaded (eager modules, SDPA)" + compiled_note + only)
        with compiled_forward(loaded, settings.compile, unmodified_rows[key]):
            measure(unmodified_rows[key], loaded, inputs, key, prefill_only=prefill_only)
        unmodified_rows[key].image_tokens = float(adapter.visual_mask(inputs["input_ids"]).sum(1).float().mean())
        unmodified_rows[key].tokens_per_layer = [length] * len(adapter.decoder_layers)
        unmodified_rows[key].flops_share = 1.0
    unmodified = dataclasses.replace(unmodified_rows[key], speedup={})

    compiled = compile_model(loaded, checked, assignments or {}, settings.backend)  # type: ignore[arg-type]
    try:
        row = Row("policy", f"{compiled.plan.name} compiled by policyc ({settings.backend}){compiled_note}{only}")
        with compiled_forward(compiled.model, settings.compile, row):
            measure(row, compiled.model, inputs, settings, prefill_only=prefill_only)
        with torch.no_grad():  # the counts of one prefill, as the timed runs left them
            compiled.model(**inputs, use_cache=False, logits_to_keep=1)
        row.tokens_per_layer = policy_counts(compiled, length)
        row.image_tokens = image_tokens_at_last_layer(compiled, inputs["input_ids"])
        report = report_from_last_prefill(compiled, inputs["input_ids"], model_name)
        row.flops_share = report.flops_after.total / report.flops_before.total
        policy_row = row
    finally:
        compiled.remove()

    ideal = Row("ideal", f"the unmodified layers fed the policy's token counts, no scoring ({settings.backend})"
                         f"{compiled_note}; prefill and TTFT only")
    with compiled_decoder(adapter, settings.backend), ideal_counts(adapter, policy_row.tokens_per_layer) as seen:
        with compiled_forward(loaded, settings.compile, ideal):
            measure(ideal, loaded, inputs, settings, prefill_only=True)
        with torch.no_grad():
            loaded(**inputs, use_cache=False, logits_to_keep=1)
        ideal.tokens_per_layer = list(seen)
    ideal.image_tokens, ideal.flops_share = policy_row.image_tokens, policy_row.flops_share

    name = compiled.plan.checked.program.policy.name
    reference = Row("reference")
    why = unavailable(name, no_reference, adapter.family, compiled)
    if why is None and settings.compile != "none":
        why = "--compile measures the unmodified, ideal and policy rows (the reference runs its eager attention)"
    if why is not None:
        reference.note = f"not run: {why}"
    else:
        reference.note = (f"{references(adapter.family)[name][1]}; no KV cache: prefill/TTFT only (generate to the "
                          "first token)")
        with eager_once(loaded):
            reference.ttft_s, reference.peak_prefill_bytes, kept, _ = timed(
                lambda: run_reference(name, loaded, inputs, compiled), device, settings.warmup, settings.repeats)
        reference.image_tokens = kept
    rows = [unmodified, ideal, policy_row, reference]
    _speedups(rows)
    result = {"machine": machine(), "device": device_name(device), "versions": versions(),
              "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "model": model_name, "policy": name, "settings": vars(settings) | {"shapes": shapes},
              "kernels": "fused" if fused_on(device) else "eager",
              "rows": [r.to_json() for r in rows]}
    render(result, rows, console)
    if json_path is not None:
        terminal.write_json(json_path, result, console)
    return result


def _speedups(rows: list[Row]) -> None:
    """t_unmodified / t_row for prefill and TTFT; for the policy also t_ideal / t_policy and t_reference / t_policy."""
    unmodified, ideal, policy, reference = rows
    for row in rows[1:]:
        for figure in ("prefill_s", "ttft_s"):
            base, mine = getattr(unmodified, figure), getattr(row, figure)
            if base and mine:
                row.speedup[f"{figure[:-2]}_vs_unmodified"] = base / mine
    for figure in ("prefill_s", "ttft_s"):
        if getattr(ideal, figure) and getattr(policy, figure):
            policy.speedup[f"{figure[:-2]}_ideal_over_policy"] = getattr(ideal, figure) / getattr(policy, figure)
    if reference.ttft_s and policy.ttft_s:
        policy.speedup["ttft_reference_over_policy"] = reference.ttft_s / policy.ttft_s


def machine() -> dict[str, Any]:
    import os

    return {"node": platform.node(), "platform": platform.platform(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str]:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "transformers", "policyc")}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def _mib(count: int | None, device: str) -> str:
    if count is None:
        return "n/a" if not device.startswith("cuda") else "-"
    return f"{count / 2**20:.1f}"


def render(result: dict[str, Any], rows: list[Row], console: Console) -> None:
    settings = result["settings"]
    title = (f"policyc bench: {escape(result['policy'])} on {escape(result['model'])}, {result['device']}, batch "
             f"{settings['batch']}, {settings['images']} image(s), {settings['prompt_len']} text tokens, "
             f"{settings['dtype']}, {settings['backend']}, {result['kernels']} kernels, {settings['cache']} cache, "
             f"{'' if settings.get('compile', 'none') == 'none' else 'torch.compile ' + settings['compile'] + ', '}"
             f"median of {settings['repeats']}")
    table = Table("row", "prefill ms", "TTFT ms", "decode tok/s", "peak MiB", "KV MiB", "img tok", "FLOPs", "time",
                  "speedup", "ideal/pol", title=title, title_justify="left")
    base = rows[0].prefill_s
    for row in rows:
        rate = "-" if row.decode_tokens_per_s is None else f"{row.decode_tokens_per_s:.1f}"
        share = f"{row.prefill_s / base:.2f}" if row.prefill_s and base else "-"
        speed = row.speedup.get("prefill_vs_unmodified", row.speedup.get("ttft_vs_unmodified"))
        ratio = row.speedup.get("prefill_ideal_over_policy")
        table.add_row(row.name, _ms(row.prefill_s), _ms(row.ttft_s), rate,
                      _mib(row.peak_prefill_bytes, settings["device"]),
                      "-" if row.kv_bytes is None else f"{row.kv_bytes / 2**20:.2f}",
                      "-" if row.image_tokens is None else f"{row.image_tokens:.1f}",
                      "-" if row.flops_share is None else f"{row.flops_share:.2f}", share,
                      "-" if speed is None else f"{speed:.2f}x", "-" if ratio is None else f"{ratio:.2f}")
    console.print(table)
    for row in rows:
        console.print(f"[dim]{row.name}: {escape(row.note)}[/dim]")
        if row.recompiles is not None:
            console.print(f"[dim]{row.name}: {row.recompiles} graph(s) torch._dynamo compiled during the timed runs"
                          "[/dim]")
        if row.cudagraph_skips is not None:
            console.print(f"[dim]{row.name}: {row.cudagraph_skips} compiled graph(s) ran without CUDA graphs "
                          "(inductor's cudagraph_skips)[/dim]")
    console.print("[dim]img tok: image tokens at the last LLM layer (batch mean). FLOPs: analytic prefill FLOPs share; "
                  "time: prefill time share (both over the unmodified model's). speedup: t_unmodified / t_row "
                  "(prefill; TTFT for the reference). ideal/pol: t_ideal / t_policy (prefill). peak: CUDA memory "
                  "during prefill (n/a off CUDA)[/dim]")


__all__ = ["bench_command", "load_bench_model", "render"]
