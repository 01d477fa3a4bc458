"""`policyc run`: load a model (the embedded default, a hub id, a local directory or an artifact),
compile a policy onto it, generate from an image and a prompt, and report what was kept and how long
prefill and decoding took."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from policyc import terminal
from policyc.artifact import Artifact, compile_artifact, is_artifact, read_artifact
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.models.bundled import (
    DEFAULT_NAME,
    load_reference_model,
    load_reference_processor,
    reference_name,
)


@dataclass(frozen=True)
class Target:
    """What `policyc run [MODEL] [POLICY]` names: a model reference and a policy, or an artifact."""

    model: str  # DEFAULT_NAME, a hub id or a directory
    policy: str | None = None
    artifact: Path | None = None


def _is_policy(reference: str) -> bool:
    """A `.tokpol` file (or FILE:NAME) or a standard-library policy name."""
    from policyc.lang import check_stdlib

    path = reference.partition(":")[0] if not Path(reference).exists() else reference
    return (Path(path).is_file() and not Path(path).is_dir()) or reference in check_stdlib()


def resolve_target(first: str | None, second: str | None) -> Target:
    """`run` -> the default model; `run POLICY`; `run MODEL`; `run ARTIFACT`; `run MODEL POLICY`."""
    if first is None:
        return Target(DEFAULT_NAME)
    if second is None:
        if is_artifact(first):
            return Target("", artifact=Path(first))
        if _is_policy(first):
            return Target(DEFAULT_NAME, first)
        return Target(reference_name(first))
    if is_artifact(first):
        raise PolicyError.at(f"{first} is a compile artifact: it already holds its policy, so POLICY "
                             f"('{second}') cannot be given too", None, f"run it alone: policyc run {first}")
    return Target(reference_name(first), second)


def prompt_inputs(processor: Any, image_path: Path, prompt: str, device: str | torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Tokenized prompt around one image: the processor's chat template if it has one, else `<image>\\n`."""
    from PIL import Image

    try:
        image = Image.open(image_path).convert("RGB")
    except (OSError, ValueError) as error:
        raise PolicyError.at(f"cannot read the image {image_path}: {error}", None,
                             "pass a PNG or JPEG file with --image") from None
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    else:
        text = f"{getattr(processor, 'image_token', '<image>')}\n{prompt}"
    inputs = processor(images=image, text=text, return_tensors="pt")
    out = {k: v.to(device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    out["pixel_values"] = out["pixel_values"].to(dtype)
    return out


@dataclass(frozen=True)
class Timings:
    prefill_s: float  # from the call to the first token's logits: encoder, projector and LLM prefill
    new_tokens: int
    decode_s: float  # from the first token's logits to the last's

    @property
    def decode_tokens_per_s(self) -> float | None:
        return (self.new_tokens - 1) / self.decode_s if self.new_tokens > 1 and self.decode_s > 0 else None


def generate_timed(model: Any, inputs: dict[str, torch.Tensor], max_new_tokens: int,
                   ) -> tuple[torch.Tensor, Timings]:
    """Greedy `generate()`, with a time stamp each time the model hands logits to the logits processors."""
    from transformers import LogitsProcessor, LogitsProcessorList

    synchronize = torch.cuda.synchronize if inputs["input_ids"].is_cuda else (lambda: None)
    stamps: list[float] = []

    class Clock(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            synchronize()
            stamps.append(time.perf_counter())
            return scores

    synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([Clock()]))
    new = output[:, inputs["input_ids"].shape[1]:]
    return new, Timings(stamps[0] - start, len(stamps), stamps[-1] - stamps[0])


@dataclass
class Session:
    """A model ready to run: loaded, compiled (unless no policy was given), with its processor."""

    reference: str
    model: Any
    processor: Any
    compiled: Any | None
    artifact: Artifact | None = None


def open_session(target: Target, assignments: dict[str, ir.Expr], device: str, backend: str = "eager") -> Session:
    from policyc.runtime import compile_model

    if target.artifact is not None:
        artifact = read_artifact(target.artifact)
        if assignments:
            raise PolicyError.at("--param cannot change an artifact's parameters (they are part of it)", None,
                                 "compile again with `policyc compile MODEL POLICY --param ... -o DIR`")
        model = load_reference_model(artifact.model_ref, device)
        compiled = compile_artifact(artifact, model)
        return Session(artifact.model_ref, model, load_reference_processor(artifact.model_ref), compiled, artifact)
    model = load_reference_model(target.model, device)
    processor = load_reference_processor(target.model)
    if target.policy is None:
        if assignments:
            raise PolicyError.at("--param needs a POLICY", None, "e.g. policyc run fastv --param ratio=25%")
        return Session(target.model, model, processor, None)
    from policyc.show import find_one_policy

    return Session(target.model, model, processor,
                   compile_model(model, find_one_policy(target.policy), assignments, backend))  # type: ignore[arg-type]


def decode_text(processor: Any, tokens: torch.Tensor) -> str:
    return processor.batch_decode(tokens, skip_special_tokens=True)[0]


def image_for_display(processor: Any, pixel_values: torch.Tensor) -> Any:
    """[H, W, 3] floats in [0, 1]: the model's input image with the processor's normalization undone."""
    pixels = pixel_values[0].detach().float().cpu()
    images = getattr(processor, "image_processor", None)
    mean, std = getattr(images, "image_mean", None), getattr(images, "image_std", None)
    if mean is not None and std is not None:
        pixels = pixels * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:
        low, high = pixels.amin(), pixels.amax()
        pixels = (pixels - low) / (high - low).clamp(min=1e-6)
    return pixels.clamp(0, 1).permute(1, 2, 0).numpy()


__all__ = ["Session", "Target", "Timings", "decode_text", "generate_timed", "image_for_display",
           "open_session", "prompt_inputs", "resolve_target", "run_command"]


def run_command(model: str | None, policy: str | None, *, image: Path | None, prompt: str | None, max_new_tokens: int,
                assignments: dict[str, ir.Expr], show_tokens: Path | None, device: str,
                console: Any = None, backend: str = "eager", json_path: Path | None = None) -> None:
    """`policyc run`: everything it prints, in order (text, tokens kept per stage, cost, timings), and with
    `json_path` the same as JSON (the output, the compile report of this prompt, the timings)."""
    from rich.markup import escape
    from rich.table import Table

    from policyc.models.bundled import EXAMPLE_QUESTION, example_image_path
    from policyc.report import report_from_last_prefill

    console = console or terminal.console(json_path)
    session = open_session(resolve_target(model, policy), assignments, device, backend)
    if show_tokens is not None and session.compiled is not None and not session.compiled.plan.adapter.draws_tokens:
        raise PolicyError.at(f"--show-tokens cannot place this model's image tokens on its images yet "
                             f"({session.compiled.plan.adapter.family}: its adapter knows no grid for them)", None,
                             "run without --show-tokens: the table of tokens kept per stage still prints")
    if session.artifact is not None and (changes := session.artifact.version_changes()):
        console.print(f"[dim]note: the artifact was written with other library versions ({', '.join(changes)})[/dim]")
    dtype = next(session.model.parameters()).dtype
    inputs = prompt_inputs(session.processor, image or example_image_path(), prompt or EXAMPLE_QUESTION, device,
                           dtype)
    tokens, timings = generate_timed(session.model, inputs, max_new_tokens)
    text = decode_text(session.processor, tokens)
    console.print(f"[bold]output[/bold] ({timings.new_tokens} tokens): {escape(repr(text))}")
    report = None
    if session.compiled is not None:
        report = report_from_last_prefill(session.compiled, inputs["input_ids"], session.reference)
        report.render(console)
    else:
        console.print("no policy: the model ran unchanged")
    table = Table("prefill (encoder + LLM)", "decode", "new tokens", title="timings (this run)", title_justify="left")
    rate = timings.decode_tokens_per_s
    table.add_row(f"{timings.prefill_s * 1e3:.1f} ms", f"{rate:.1f} tokens/s" if rate is not None else "-",
                  str(timings.new_tokens))
    console.print(table)
    if show_tokens is not None:
        if report is None:
            raise PolicyError.at("--show-tokens needs a POLICY: without one every token is kept", None)
        from policyc.show_tokens import draw_kept_tokens

        images = session.compiled.plan.adapter.image_layouts(inputs)
        draw_kept_tokens(show_tokens, images, report.kept, f"policy {report.policy}",
                         lambda pixels: image_for_display(session.processor, pixels[None]))
        console.print(f"wrote {show_tokens}", soft_wrap=True)  # a path stays on one line, whatever its length
    if json_path is not None:
        terminal.write_json(json_path, {
            "model": session.reference, "policy": None if report is None else report.policy, "output": text,
            "new_tokens": timings.new_tokens, "report": None if report is None else report.to_json(),
            "timings": {"prefill_ms": timings.prefill_s * 1e3, "decode_tokens_per_s": rate}}, console)
