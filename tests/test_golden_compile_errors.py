"""Golden tests for compile-time diagnostics: each tests/golden/errors/compile/*.tokpol checks fine
but cannot be compiled onto its tiny model, named by the file's prefix (`qwen2_vl_`, `gemma3_`, `idefics3_`,
`llava_next_`, `siglip_` for LLaVA with SigLIP), LLaVA with CLIP otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import check_golden
from tiny_gemma3 import tiny_gemma3
from tiny_idefics3 import tiny_idefics3
from tiny_llava_next import tiny_anyres
from tiny_models import tiny_llava_clip, tiny_llava_siglip, tiny_qwen2_vl

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.runtime import compile_model

GOLDEN_DIR = Path(__file__).parent / "golden" / "errors" / "compile"
INPUTS = sorted(GOLDEN_DIR.glob("*.tokpol"))
MODELS = {"clip": tiny_llava_clip(), "siglip": tiny_llava_siglip(), "qwen2_vl": tiny_qwen2_vl(),
          "gemma3": tiny_gemma3(), "idefics3": tiny_idefics3(), "llava_next": tiny_anyres("llava_next")}


def test_there_are_golden_inputs() -> None:
    assert len(INPUTS) >= 5


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_compile_error(source: Path, update_goldens: bool) -> None:
    checked = check_source(source.read_text(encoding="utf-8"), source.name)[0]  # valid as a policy
    model = next((m for name, m in MODELS.items() if source.stem.startswith(f"{name}_")), MODELS["clip"])
    with pytest.raises(PolicyError) as caught:
        compile_model(model, checked).remove()
    rendered = str(caught.value)
    assert all(d.span is not None and d.span.file == source.name for d in caught.value.diagnostics), rendered
    check_golden(source.with_suffix(".err"), rendered + "\n", update_goldens)
