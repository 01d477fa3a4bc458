"""Golden tests for compile-time diagnostics: each tests/golden/errors/compile/*.tokpol checks fine
but cannot be compiled onto the tiny LLaVA model (SigLIP for `siglip_*` files, CLIP otherwise)."""

from __future__ import annotations

from pathlib import Path

import pytest
from golden import check_golden
from tiny_models import tiny_llava_clip, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.lang import check_source
from policyc.runtime import compile_model

GOLDEN_DIR = Path(__file__).parent / "golden" / "errors" / "compile"
INPUTS = sorted(GOLDEN_DIR.glob("*.tokpol"))
MODELS = {"clip": tiny_llava_clip(), "siglip": tiny_llava_siglip()}


def test_there_are_golden_inputs() -> None:
    assert len(INPUTS) >= 5


@pytest.mark.parametrize("source", INPUTS, ids=lambda p: p.stem)
def test_compile_error(source: Path, update_goldens: bool) -> None:
    checked = check_source(source.read_text(encoding="utf-8"), source.name)[0]  # valid as a policy
    model = MODELS["siglip" if source.stem.startswith("siglip_") else "clip"]
    with pytest.raises(PolicyError) as caught:
        compile_model(model, checked).remove()
    rendered = str(caught.value)
    assert all(d.span is not None and d.span.file == source.name for d in caught.value.diagnostics), rendered
    check_golden(source.with_suffix(".err"), rendered + "\n", update_goldens)
