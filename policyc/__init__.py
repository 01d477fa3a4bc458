"""policyc: a declarative compiler for visual-token compression policies in vision-language models.

    import policyc
    model = policyc.compile(model, "fastv", ratio="25%")  # in place; model.policyc is the CompiledModel
    model = policyc.load("fastv.artifact")                # an artifact of `policyc compile ... -o DIR`
    checked = policyc.parse("policy p { ... }")           # or a path, or a standard-library name
    result = policyc.search("default", "fastv,pyramiddrop")  # Pareto front of accuracy vs FLOPs: result.front

Importing `policyc` imports neither torch nor transformers; each function imports what it needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from policyc.lang import CheckedPolicy
    from policyc.lang.ir import Expr


def parse(text_or_path: str | Path, name: str | None = None) -> CheckedPolicy:
    """Parse and check one policy: `.tokpol` source text, a path to a file, or a standard-library name.

    A file holding several policies needs `name`. Raises `policyc.errors.PolicyError`.
    """
    from policyc.errors import PolicyError, suggestion
    from policyc.lang import Loader, check_path, check_source, check_stdlib

    loader = Loader()
    reference = str(text_or_path)
    if isinstance(text_or_path, Path) or (len(reference) < 4096 and "\n" not in reference
                                          and Path(reference).is_file()):
        found, where = check_path(text_or_path, loader), reference
    elif reference.isidentifier():
        stdlib = check_stdlib(loader)
        if reference not in stdlib:
            raise PolicyError.at(f"no file or standard-library policy named '{reference}'", None,
                                 suggestion(reference, sorted(stdlib), "policies"))
        found, where = [stdlib[reference]], reference
    else:
        found, where = check_source(reference, "<string>", loader), "the text"
    if name is not None:
        chosen = [c for c in found if c.program.policy.name == name]
        if not chosen:
            raise PolicyError.at(f"no policy '{name}' in {where}", None,
                                 suggestion(name, [c.program.policy.name for c in found], "policies"))
        return chosen[0]
    if len(found) != 1:
        names = [c.program.policy.name for c in found]
        raise PolicyError.at(f"{where} holds {len(found)} policies ({', '.join(names)})", None,
                             f"pick one: policyc.parse(..., name={names[0]!r})" if names else None)
    return found[0]


def _expr(name: str, value: Any) -> Expr:
    """A parameter value from Python: an IR literal, a number, or text as written in a policy ('25%')."""
    from policyc.errors import PolicyError
    from policyc.lang import ir
    from policyc.lang.build import parse_value

    if isinstance(value, ir.Number | ir.Percent | ir.String | ir.Name):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PolicyError.at(f"parameter '{name}': {value!r} is not a value", None,
                             "pass a number (64, 0.5) or text as in a policy ('25%', 'max')")
    if isinstance(value, str):
        return parse_value(value, f"parameter {name}")
    return ir.Number(value=value)


def _uncompile(model: Any) -> None:
    """Undo an earlier `compile` or `load` of `model`, if any."""
    previous = model.__dict__.pop("policyc", None)
    model.__dict__.pop("policyc_artifact", None)
    if previous is not None:
        previous.remove()


def compile(model: Any, policy: Any, params: Mapping[str, Any] | None = None, *, backend: str = "eager",
            **values: Any) -> Any:
    """Compile `policy` onto `model` in place and return `model`; `model.policyc` is the `CompiledModel`
    (`model.policyc.remove()` restores the original model). Compiling again replaces the previous policy.

    `policy`: a checked policy (`policyc.parse`), a `.tokpol` path holding one policy, or a standard-library
    name. Parameters: keyword arguments (`ratio="25%"`, `layer=2`), or `params` for qualified names
    (`{"fastv.ratio": "25%"}`). `backend`: "eager" (the reference semantics), "inductor" (the LLM captured by
    torch.compile, its prefill graph rewritten by graph passes and compiled by inductor; LLM prefill
    stages) or "fx" (the rewritten graphs without inductor).
    """
    from policyc.runtime import compile_model

    assignments = {name: _expr(name, value) for name, value in {**(params or {}), **values}.items()}
    _uncompile(model)
    model.policyc = compile_model(model, policy, assignments, backend)  # type: ignore[arg-type]
    return model


def load(directory: str | Path, model: Any = None, *, device: str = "cpu") -> Any:
    """Load a compile artifact (`policyc compile MODEL POLICY -o DIR`) and return the compiled model.

    Without `model`, the model the artifact references is loaded (hub id, local directory or the
    embedded default) onto `device`; with one, its config must be the one the artifact was compiled for.
    `model.policyc` is the `CompiledModel`, `model.policyc_artifact` the checked artifact.
    """
    from policyc.artifact import compile_artifact, load_artifact_model, read_artifact

    artifact = read_artifact(directory)
    if model is None:
        model = load_artifact_model(artifact, device=device)
    _uncompile(model)
    model.policyc = compile_artifact(artifact, model)
    model.policyc_artifact = artifact
    return model


def search(model: Any, space: Any, *, evaluate: Any = None, processor: Any = None, data: str = "synthetic",
           split: str = "validation", limit: int = 200, batch_size: int = 32,
           objectives: Any = ("accuracy", "flops"), constraints: Mapping[str, float] | None = None,
           n_trials: int = 40, storage: str | None = None, study_name: str | None = None, sampler: Any = None,
           seed: int = 0, device: str = "cpu") -> Any:
    """Search `space` for the best policies on `model`; returns a `policyc.policy_search.SearchResult` whose `front`
    holds the Pareto-optimal concrete policies (`.text`, canonical .tokpol) with their measured figures.

    `model`: a loaded model, or a reference as in the CLI ("default", a directory, a hub id). `space`: a
    `CheckedSearch`, a .tokpol file (FILE:NAME), or standard-library names ("fastv,pyramiddrop").
    `evaluate(compiled, candidate) -> {figure: value}`: default the evaluation harness on `data`/`split`/`limit`
    (accuracy, vqa_score, flops, kv, image_tokens, latency_ms), which needs `processor` for a loaded model.
    `objectives`: names (directions known) or {name: "maximize"|"minimize"}; `constraints`: {figure: bound}.
    `storage`: an Optuna RDB URL (default: sqlite file policyc-search.db here); `n_trials` counts finished
    trials of the whole study, so calling again resumes it.
    """
    from policyc.models.bundled import load_reference_model, load_reference_processor, reference_name
    from policyc.policy_search import harness, load_space
    from policyc.policy_search import search as run_search

    checked = load_space(space if not isinstance(space, Path) else str(space))
    if isinstance(model, str | Path):
        reference = reference_name(str(model))
        processor = processor or load_reference_processor(reference)
        model = load_reference_model(reference, device)
    else:
        reference = getattr(model.config, "_name_or_path", "") or type(model).__name__
    data_key = ""
    if evaluate is None:
        from policyc.errors import PolicyError
        from policyc.evaluation import load_items

        if processor is None:
            raise PolicyError.at("the default evaluation needs the model's processor", None,
                                 "pass processor=..., a model reference, or evaluate=...")
        evaluate = harness(model, processor, load_items(data, split, limit), batch_size)
        data_key = f"{data}:{split}:{limit}"
    return run_search(model, checked, evaluate, model_ref=reference, data_key=data_key, objectives=objectives,
                      constraints=constraints, n_trials=n_trials, storage=storage, study_name=study_name,
                      sampler=sampler, seed=seed)


__all__ = ["compile", "load", "parse", "search"]
