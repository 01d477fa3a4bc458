"""The `reference` row of `policyc bench`: the plain reference implementation of the same method, from the
source checkout's tests/reference (plain loops, eager attention, no KV cache; they import nothing from policyc).

Each standard-library name maps to a call of its reference with the compiled plan's parameter values; the
call runs `max_new_tokens=1` (the references recompute without a cache, so only their prefill / time to first
token means anything) and returns the image tokens each row kept at the last LLM layer. The references copy
the model to eager attention on each call (`reference.fastv.eager_copy`); the bench makes that copy once,
outside the timing, and hands it to them as the copy.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import policyc
from policyc.lang import ir

Call = Callable[[Any, dict[str, torch.Tensor], Callable[[str], Any]], float]


def reference_dir() -> Path:
    """tests/reference of the source checkout policyc runs from (absent in an installed wheel)."""
    return Path(policyc.__file__).resolve().parents[1] / "tests" / "reference"


def load(name: str) -> ModuleType:
    """`reference.<name>` imported as a package from the checkout's tests directory."""
    tests = str(reference_dir().parent)
    if tests not in sys.path:
        sys.path.append(tests)
    return importlib.import_module(f"reference.{name}")


def _image_tokens(input_ids: torch.Tensor, image_token_id: int, rows: list[torch.Tensor]) -> float:
    """Mean over rows of the image tokens among each row's kept prompt rows (indices into that row)."""
    counts = [int((input_ids[b, r.to(input_ids.device)] == image_token_id).sum()) for b, r in enumerate(rows)]
    return sum(counts) / len(counts)


def _fastv(model: Any, inputs: dict[str, torch.Tensor], value: Callable[[str], Any]) -> float:
    _, kept = load("fastv").fastv_generate(model, **inputs, layer=value("layer"), keep=float(value("ratio")),
                                           max_new_tokens=1, rows=value("rows"))
    return sum(len(k) for k in kept) / len(kept)


def _pyramiddrop(model: Any, inputs: dict[str, torch.Tensor], value: Callable[[str], Any]) -> float:
    _, kept, _ = load("pyramiddrop").pyramiddrop_generate(model, **inputs, layers=value("llm layers"),
                                                          lam=value("lam"), max_new_tokens=1)
    return _image_tokens(inputs["input_ids"], model.config.image_token_id, [stages[-1] for stages in kept])


def _mustdrop(model: Any, inputs: dict[str, torch.Tensor], value: Callable[[str], Any]) -> float:
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    results = load("mustdrop").mustdrop_generate(model, **inputs, pruning=[2, 6, 10, 14], g_thr=value("g_thr"),
                                                 i_thr=value("i_thr"), key_count=math.ceil(n_image * 0.08),
                                                 max_new_tokens=1)
    return _image_tokens(inputs["input_ids"], model.config.image_token_id, [r.kept[-1] for r in results])


def _random_drop(model: Any, inputs: dict[str, torch.Tensor], value: Callable[[str], Any]) -> float:
    _, kept = load("random_drop").random_drop_generate(model, **inputs, fraction=float(value("ratio")),
                                                       seed=int(value("seed")), max_new_tokens=1)
    return sum(len(k) for k in kept) / len(kept)


def _visionzip(model: Any, inputs: dict[str, torch.Tensor], value: Callable[[str], Any]) -> float:
    """VisionZip's features (reference.visionzip), then the LLM on the text and the filled image slots, one row
    at a time without a cache (reference.random_drop's greedy loop)."""
    features, filled = load("visionzip").visionzip_image_features(model, inputs["pixel_values"],
                                                                   int(value("dominant")), int(value("contextual")))
    greedy = load("random_drop").greedy_no_cache
    input_ids, image_id = inputs["input_ids"], model.config.image_token_id
    embeds = model.get_input_embeddings()(input_ids)
    image = input_ids == image_id
    per_row = image.sum(1)
    features, filled = features.reshape(-1, features.shape[-1]), filled.reshape(-1).to(input_ids.device)
    start = 0
    for b in range(input_ids.shape[0]):
        row = embeds[b].clone()
        row[image[b]] = features[start:start + int(per_row[b])].to(row.dtype)
        keep = ~image[b]
        keep[image[b]] = filled[start:start + int(per_row[b])]
        start += int(per_row[b])
        greedy(model, row[keep], inputs["attention_mask"][b, keep].bool(), 1)
    return float(filled.sum()) / input_ids.shape[0]


def _fastv_mrope(model: Any, inputs: dict[str, torch.Tensor], value: Callable[[str], Any]) -> float:
    """FastV on Qwen2-VL / Qwen2.5-VL (M-RoPE positions): the last prompt token's attention, as its code does."""
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    _, kept = load("fastv_mrope").fastv_mrope_generate(model, inputs, layer=value("layer"),
                                                       keep=math.floor(n_image * float(value("ratio"))),
                                                       max_new_tokens=1)
    return sum(len(k) for k in kept) / len(kept)


REFERENCES: dict[str, tuple[Call, str]] = {
    "fastv": (_fastv, "reference/fastv.py fastv_generate"),
    "pyramiddrop": (_pyramiddrop, "reference/pyramiddrop.py pyramiddrop_generate"),
    "mustdrop": (_mustdrop, "reference/mustdrop.py mustdrop_generate (LLM stages and cache; no encoder merge)"),
    "random_drop": (_random_drop, "reference/random_drop.py random_drop_generate"),
    "visionzip": (_visionzip, "reference/visionzip.py features + the LLM without a cache"),
}
QWEN_REFERENCES: dict[str, tuple[Call, str]] = {  # Qwen2-VL / Qwen2.5-VL: M-RoPE positions
    "fastv": (_fastv_mrope, "reference/fastv_mrope.py fastv_mrope_generate"),
}


def references(family: str) -> dict[str, tuple[Call, str]]:
    """The bench's reference implementations for a model family: LLaVA's, and Qwen2-VL's M-RoPE ones (GLM-4.1V's
    positions are the same); none yet for the others (Qwen3-VL's must drop DeepStack features too:
    tests/reference/fastv_deepstack.py)."""
    return {"llava": REFERENCES, "qwen2_vl": QWEN_REFERENCES, "glm4v": QWEN_REFERENCES}.get(family, {})


def parameter(compiled: Any, name: str) -> Any:
    """The value the compiled plan bound to parameter `name`: a number, a share in [0, 1], or a name; `llm layers`
    (no parameter can be named so): the LLM layers its stages run at on this model (`depth / 4 - 1`, ... resolved)."""
    if name == "llm layers":
        return [k for stage in compiled.plan.stages if stage.kind == "llm" for k in stage.layers]
    for stage in compiled.plan.stages:
        expr = stage.values.get(name)
        if isinstance(expr, ir.Percent):
            return expr.value / 100
        if isinstance(expr, ir.Number):
            return expr.value
        if isinstance(expr, ir.Name):
            return expr.id
    raise KeyError(name)


def unavailable(policy: str, no_reference: bool, family: str = "llava", compiled: Any = None) -> str | None:
    """Why the reference row has no figures, or None when it can run (`compiled`: the policy, for its values)."""
    if no_reference:
        return "--no-reference"
    table = references(family)
    if policy not in table:
        return (f"no reference implementation of '{policy}' for {family} models in the bench's table "
                f"({', '.join(sorted(table))})")
    if table is QWEN_REFERENCES and compiled is not None and parameter(compiled, "rows") != "last":
        return "the M-RoPE FastV reference scores by the last prompt token only (rows=last)"
    if not (reference_dir() / "__init__.py").is_file():
        return f"tests/reference is not next to the package ({reference_dir()}): an installed wheel, not a checkout"
    return None


@contextmanager
def eager_once(model: Any) -> Iterator[Any]:
    """One eager-attention copy of `model`, handed to the references in place of the copy they make per call."""
    fastv = load("fastv")
    copy = fastv.eager_copy(model)
    modules = [(load(name), "eager_copy") for name in ("fastv", "staged_drop", "mustdrop")]
    modules.append((load("fastv_mrope"), "_eager"))
    saved = [getattr(m, attribute) for m, attribute in modules]
    for module, attribute in modules:
        setattr(module, attribute, lambda _model: copy)
    try:
        yield copy
    finally:
        for (module, attribute), original in zip(modules, saved, strict=True):
            setattr(module, attribute, original)


def run_reference(policy: str, model: Any, inputs: dict[str, torch.Tensor], compiled: Any) -> float:
    """One call of `policy`'s reference on `inputs` (to the first token); the image tokens it kept per row."""
    call, _ = references(compiled.plan.adapter.family)[policy]
    return call(model, inputs, lambda name: parameter(compiled, name))


__all__ = ["QWEN_REFERENCES", "REFERENCES", "eager_once", "parameter", "reference_dir", "references",
           "run_reference", "unavailable"]
