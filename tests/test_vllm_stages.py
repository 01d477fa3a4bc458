"""policyc.integrations.vllm's stages without vLLM: on the bundled model, each servable policy's pre-LLM run on the
shell (the transformers tower and projector the vLLM model serves with) keeps the same slots and embeddings as
policyc compiled onto the whole transformers model; the probe's count equals them; and everything else is refused
at its policy line with the nearest servable policy, as is a malformed `hf_overrides` entry.
(vLLM itself: tests/integrations/test_vllm.py.)"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import make_inputs, tiny_llava_siglip

from policyc.errors import PolicyError
from policyc.evaluation import prompt_text, synthetic_items
from policyc.integrations.vllm.deployment import deployment
from policyc.integrations.vllm.guard import check_deployment
from policyc.integrations.vllm.shell import llava_shell
from policyc.integrations.vllm.stages import SERVABLE, PreLLM, kept_count
from policyc.models.bundled import DEFAULT_NAME, load_reference_model, load_reference_processor
from policyc.runtime import compile_model

CASES = [(name, {}) for name in SERVABLE] + [
    ("fastervlm", {"tokens": 20}), ("tome", {"r": 4, "order": "code"}), ("hiprune", {"tokens": 64}),
    ("gtp_vit", {"r": 2}), ("expedit", {"size": 8}), ("fopru", {"strategy": "row"}),
]


@pytest.fixture(scope="module")
def bundled() -> tuple[Any, Any, dict[str, torch.Tensor]]:
    model = load_reference_model(DEFAULT_NAME)
    processor = load_reference_processor(DEFAULT_NAME)
    items = synthetic_items("test", 3)
    inputs = processor(images=[[i.image] for i in items], text=[prompt_text(processor, i.question) for i in items],
                       padding=True, return_tensors="pt")
    return model, processor, dict(inputs)


@pytest.fixture(scope="module")
def shell(bundled: tuple[Any, Any, dict[str, torch.Tensor]]) -> Any:
    model = bundled[0]
    built = llava_shell(model.config)
    served = {k: v for k, v in model.state_dict().items() if ".language_model." not in k and "lm_head" not in k}
    missing, unexpected = built.load_state_dict(served, strict=False)
    assert not unexpected and all(".language_model." in k or "lm_head" in k for k in missing)
    return built


def _config(model: Any, entry: object) -> Any:
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.policyc = entry
    return config


def _kept_both_ways(model: Any, shell: Any, served: Any, pixel_values: torch.Tensor) -> tuple[list, list]:
    """Each image's kept slots from policyc compiled onto the transformers model, and from the shell's pre-LLM run."""
    compiled = compile_model(model, served.policy, served.assignments)
    try:
        with torch.no_grad():  # the vision path of model(**inputs); kept is read before the LLM consumes it
            model.get_image_features(pixel_values=pixel_values)
        kept = [k.nonzero()[:, 0].tolist() for k in compiled.images.kept]
    finally:
        compiled.remove()
    stages = PreLLM(shell, served)
    try:
        _, slots = stages(pixel_values)
    finally:
        stages.compiled.remove()
    return kept, [s.tolist() for s in slots]


@pytest.mark.parametrize(("policy", "params"), CASES, ids=[f"{p}-{v}" for p, v in CASES])
def test_shell_keeps_what_transformers_keeps(bundled: Any, shell: Any, policy: str, params: dict[str, Any]) -> None:
    model, _, inputs = bundled
    served = deployment(_config(model, {"policy": policy, "params": params}))
    assert served is not None
    kept, slots = _kept_both_ways(model, shell, served, inputs["pixel_values"])
    count = kept_count(model.config, served)
    assert slots == kept
    assert {len(s) for s in slots} == {count}
    assert 0 < count <= 144


def test_shell_embeddings_equal_transformers(bundled: Any, shell: Any) -> None:
    """The embeddings the LLM receives: what policyc's layer-0 wrapper sees on transformers, image by image."""
    model, _, inputs = bundled
    served = deployment(_config(model, {"policy": "visionzip", "params": {}}))
    assert served is not None
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    compiled = compile_model(model, "visionzip")
    layer = model.model.language_model.layers[0]  # policyc's wrapper: its input holds every placeholder
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args[0], compiled.images.kept)),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
        compiled.remove()
    stages = PreLLM(shell, served)
    try:
        embeddings, _ = stages(inputs["pixel_values"])
    finally:
        stages.compiled.remove()
    hidden, kept = seen[0]
    for row, rows in enumerate(embeddings):
        placeholders = (inputs["input_ids"][row] == model.config.image_token_id).nonzero()[:, 0]
        torch.testing.assert_close(hidden[row][placeholders[kept[row]]], rows, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("entry", "message", "hint"), [
    ({"policy": "fastv"}, "stage llm.layer[layer] runs at llm.layer, inside the LLM", "fastervlm"),
    ({"policy": "snapkv"}, "runs at decode, inside the LLM", "fastervlm"),
    ({"policy": "globalcom2_style"}, "reads the prompt", "divprune"),
    ({"policy": "catp"}, "reads the prompt", "divprune"),
    ({"policy": "fastervlmm"}, "no file or standard-library policy named 'fastervlmm'", "did you mean 'fastervlm'?"),
    ({"policy": "fastervlm", "params": {"tokenz": 3}}, "no searchable parameter 'tokenz'", "did you mean 'tokens'?"),
    ({"policy": "fastervlm", "params": {"tokens": 0}}, "fastervlm.tokpol:12:3: error: 0 is outside the range [1, 2304] "
     "of 'tokens'", "pick a value within [1, 2304]"),
    ({"policy": "tome", "params": {"order": "random"}}, "random is not one of the choices {spatial, code} of 'order'",
     "pick one of"),
    ({"policy": "fastervlm", "params": {"tokens": [1]}}, "policyc.params.tokens is [1]", "a percentage"),
    ("fastervlm", "hf_overrides policyc is 'fastervlm', not a policy", '{"policyc": {"policy": "visionzip"'),
    ({"policy": "grid", "ratio": "25%"}, "unknown field 'ratio'", "valid fields: params, policy"),
    ({"params": {}}, "names no policy", "visionzip"),
])
def test_refusals(bundled: Any, entry: object, message: str, hint: str) -> None:
    model = bundled[0]
    with pytest.raises(PolicyError) as caught:
        served = deployment(_config(model, entry))
        assert served is not None
        kept_count(model.config, served)
    assert message in str(caught.value)
    assert hint in str(caught.value)


REFUSED = ["fastv", "flowcut", "globalcom2_style", "h2o", "holitom_temporal", "mmtok", "pyramiddrop",
           "pyramiddrop_snapkv", "snapkv", "streamingllm", "visiondrop", "visiondrop_llm", "zipvl", "zipvl_v1", "todre",
           "turbo", "ats", "catp", "efficientvla", "corematching"]


def test_every_standard_policy_is_servable_or_refused() -> None:
    from policyc.resources import stdlib_files

    assert set(stdlib_files()) == set(SERVABLE) | set(REFUSED) | {"mustdrop", "sparsevlm"}  # these two: their LLM
    # layers (10, 15) are past the bundled model's 8, refused for that first


@pytest.mark.parametrize("policy", REFUSED)
def test_refused_policies_name_the_reason_and_a_servable_policy(bundled: Any, policy: str) -> None:
    model = bundled[0]
    served = deployment(_config(model, {"policy": policy}))
    assert served is not None
    with pytest.raises(PolicyError) as caught:
        kept_count(model.config, served)
    reasons = ("inside the LLM", "reads the prompt", "depends on the image")
    for diagnostic in caught.value.diagnostics:
        assert diagnostic.span is not None and any(reason in diagnostic.message for reason in reasons)
        assert diagnostic.hint is not None and any(name in diagnostic.hint for name in SERVABLE)


def test_keeping_no_token_is_refused(tmp_path: Any, bundled: Any) -> None:
    path = tmp_path / "none.tokpol"
    path.write_text("policy none {\n  param share = 0% in [0%, 50%]\n  stage encoder.layer[-2] {\n"
                    "    keep top share of vision by attention(cls -> vision)\n  }\n}\n")
    model = bundled[0]
    served = deployment(_config(model, {"policy": str(path)}))
    assert served is not None
    with pytest.raises(PolicyError, match="policy none keeps no token of each image"):
        kept_count(model.config, served)


def test_a_family_without_a_vllm_path_is_refused() -> None:
    """`vllm serve` / `LLM(...)` check the config this way once vLLM has resolved its architecture (guard.py)."""
    from tiny_qwen3_vl import tiny_qwen3_vl

    config = tiny_qwen3_vl().config
    config.policyc = {"policy": "visionzip"}
    with pytest.raises(PolicyError) as caught:
        check_deployment(config, "Qwen3VLForConditionalGeneration")
    assert "policyc cannot serve this 'qwen3_vl' model" in str(caught.value)
    assert "its plugin serves LLaVA (a CLIP or SigLIP vision tower), Qwen2-VL, Qwen2.5-VL" in str(caught.value)
    config.policyc = ["visionzip"]
    with pytest.raises(PolicyError, match="not a policy"):
        check_deployment(config, "Qwen3VLForConditionalGeneration")
    del config.policyc
    check_deployment(config, "Qwen3VLForConditionalGeneration")  # no entry: vLLM's own model, unchecked


def test_refusal_names_the_policy_line(bundled: Any) -> None:
    model = bundled[0]
    served = deployment(_config(model, {"policy": "fastv"}))
    assert served is not None
    with pytest.raises(PolicyError) as caught:
        kept_count(model.config, served)
    diagnostic = caught.value.diagnostics[0]
    assert diagnostic.span is not None and diagnostic.span.file.endswith("fastv.tokpol")
    assert "stage llm.layer[layer] as prune {" in str(caught.value)


@pytest.mark.parametrize(("statement", "column"), [
    ("merge window(size=3, threshold=0.8) of vision by hidden", 5),
    ("keep vision where attention(cls -> vision) > 0.01", 10),
])
def test_data_dependent_count_is_refused(tmp_path: Any, bundled: Any, statement: str, column: int) -> None:
    path = tmp_path / "threshold.tokpol"
    path.write_text(f"policy threshold {{\n  stage encoder.layer[-2] {{\n    {statement}\n  }}\n}}\n")
    model = bundled[0]
    served = deployment(_config(model, {"policy": str(path)}))
    assert served is not None
    with pytest.raises(PolicyError) as caught:
        kept_count(model.config, served)
    assert "depends on the image" in str(caught.value)
    assert f"threshold.tokpol:3:{column}" in str(caught.value)
    assert "tome (a fixed r per layer)" in str(caught.value)


@pytest.mark.parametrize(("policy", "params"), [("divprune", {"ratio": "25%"}), ("grid", {}), ("pool", {}),
                                                ("tome", {"r": 2}), ("random_drop", {})])
def test_siglip_shell_keeps_what_transformers_keeps(policy: str, params: dict[str, Any]) -> None:
    """A SigLIP tower (no CLS, strategy "full"): the shell is built from the config alone, its weights loaded."""
    model = tiny_llava_siglip()
    inputs = make_inputs(model, batch=2)
    built = llava_shell(model.config)
    built.load_state_dict({k: v for k, v in model.state_dict().items() if "language_model" not in k
                           and "lm_head" not in k}, strict=False)
    served = deployment(_config(model, {"policy": policy, "params": params}))
    assert served is not None
    kept, slots = _kept_both_ways(model, built, served, inputs["pixel_values"])
    assert slots == kept
    assert {len(s) for s in slots} == {kept_count(model.config, served)}
    assert 0 < kept_count(model.config, served) < 16


def test_siglip_refuses_cls_attention() -> None:
    model = tiny_llava_siglip()
    served = deployment(_config(model, {"policy": "fastervlm"}))
    assert served is not None
    with pytest.raises(PolicyError, match="CLS"):
        kept_count(model.config, served)
