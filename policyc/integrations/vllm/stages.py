"""policyc's pre-LLM stages for vLLM: what can be served, how many tokens each image keeps, and the run itself.

vLLM fixes an image's placeholder count in the frontend, before any tower runs, and fails a request whose
encoder output has another length. A policy is servable when its stages all run before the LLM (encoder and
projector) on each image alone, and keep a count that follows from the image size and the parameters. Which tokens
are kept may depend on the image; how many may not. LLM-layer and cache stages have no hook in vLLM's paged
attention; stages that read the prompt would make an image's embedding depend on more than the image (vLLM
caches encoder outputs by the image's bytes).

`kept_count` runs the compiled stages on a miniature of the model (shell.py) and three probe images, through
policyc's own runtime: the count is the runtime's, with no second implementation. Statements whose count reads the
image (`where`, threshold merges, entropy budgets) are refused where they stand, and counts that differ between the
probes are refused too, as are parameter values outside their declared ranges. `request_count` is a request's count
under its own parameter values (at most the deployment's). `PreLLM` runs the same compiled stages on the served
tower and projector, and fails loudly (never a silently different layout) if an image ever keeps another count.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from policyc.catalog import SELECTORS
from policyc.compiler.plan import Plan
from policyc.errors import PolicyError
from policyc.integrations.vllm.deployment import KEY, Deployment, narrowed
from policyc.integrations.vllm.shell import probe_images, probe_shell
from policyc.lang import ir
from policyc.passes import SCHEDULE_OPS

SERVABLE = ("visionzip", "fastervlm", "vtc_cls", "hiprune", "tome", "divprune", "todre_diversity", "random_drop",
            "grid", "pool", "evit", "gtp_vit", "expedit", "fopru")
_LLM_HINT = ("serve a pre-LLM policy instead: fastervlm (the CLS token's attention at the encoder's feature layer) "
             "or divprune (diversity at the projector's output)")
_PROMPT_HINT = "serve a policy that reads the image alone, e.g. divprune or fastervlm"
_COUNT_HINT = "serve a policy with a fixed count, e.g. tome (a fixed r per layer), visionzip or fastervlm"


def _reads_prompt(node: ir.Node) -> bool:
    """`cover`, `text_relevance`, `top(allocate=...)`, `vision[i]`, `image`: the question or the prompt's images."""
    if isinstance(node, ir.Select):
        return "question" in SELECTORS.specs[node.selector].needs or any(o.name == "allocate" for o in node.options)
    if isinstance(node, ir.Call | ir.Name):
        return (node.fn if isinstance(node, ir.Call) else node.id) in ("text_relevance", "image")
    return isinstance(node, ir.Index)


def _count_reads_data(node: ir.Node) -> bool:
    """A `where` filter, a merge by similarity `threshold`, an adaptive budget: counts set by the image."""
    if isinstance(node, ir.Merge):
        return any(option.name == "threshold" for option in node.options)
    if isinstance(node, ir.Select):  # an adaptive schedule: `entropy`, `mass`
        return isinstance(node.amount, ir.Call) and node.amount.fn in SCHEDULE_OPS and \
            SCHEDULE_OPS[node.amount.fn].adaptive
    return isinstance(node, ir.Where)


def refuse_unservable(plan: Plan) -> None:
    """Every stage vLLM cannot serve, as one PolicyError at each stage or statement."""
    problems = []
    for stage in plan.stages:
        if stage.kind not in ("encoder", "projector"):
            problems.append(PolicyError.at(
                f"stage {stage.label} runs at {stage.point}, inside the LLM: vLLM's paged attention and KV cache give "
                f"it no hook, so policy {plan.name} cannot be served by vLLM", stage.span, _LLM_HINT))
            continue
        for node in (n for statement in stage.statements for n in statement.walk()):
            if _reads_prompt(node):
                problems.append(PolicyError.at(
                    f"stage {stage.label} reads the prompt (its question or the image's place among its images), but "
                    "vLLM encodes and caches each image alone, keyed by its bytes", node.span, _PROMPT_HINT))
                break
            if _count_reads_data(node):
                problems.append(PolicyError.at(
                    f"stage {stage.label} keeps a number of tokens that depends on the image, but vLLM sizes each "
                    "image's placeholders before the tower runs", node.span, _COUNT_HINT))
                break
    if problems:
        raise PolicyError([d for p in problems for d in p.diagnostics]).with_sources(plan.checked.sources)


class PreLLM:
    """A deployment's stages compiled onto a transformers LLaVA `shell` (its tower and projector run them)."""

    def __init__(self, shell: nn.Module, deployment: Deployment) -> None:
        from policyc.runtime import compile_model

        self.shell = shell
        self.deployment = deployment
        self.compiled = compile_model(shell, deployment.policy, deployment.assignments)
        try:
            refuse_unservable(self.compiled.plan)
        except PolicyError:
            self.compiled.remove()
            raise

    @property
    def plan(self) -> Plan:
        return self.compiled.plan

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Images [I, C, H, W] -> per image, its kept tokens' LLM embeddings [K_i, D] in the order the LLM reads
        them, and the kept slots (indices into the unpruned image tokens, ascending) [K_i] long."""
        config = self.shell.config
        output = self.shell.model.get_image_features(
            pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy)
        features = list(output.pooler_output)
        kept = self.compiled.images.kept
        if kept is None:  # no stage before the LLM dropped anything
            return features, [torch.arange(len(f), device=f.device) for f in features]
        return [f[k] for f, k in zip(features, kept, strict=True)], [k.nonzero()[:, 0] for k in kept]


_COUNTS: dict[tuple[str, str], int] = {}


def _refuse_out_of_range(stages: PreLLM, deployment: Deployment) -> None:
    """A parameter value outside the range (or choices) its policy declares is refused, at its `param` line."""
    from policyc.lang.search_space import searchable_params, value_problem

    params = searchable_params(stages.plan.checked)
    for name, value in deployment.params:
        problem = value_problem(name, value, params[name].default, params[name].domain)
        if problem is not None:
            stages.compiled.remove()
            raise PolicyError.at(problem[0], params[name].span, problem[1]).with_sources(stages.plan.checked.sources)


def kept_count(config: Any, deployment: Deployment) -> int:
    """The image tokens each image keeps under `deployment` on a LLaVA of `config` (cached per geometry)."""
    geometry = "|".join((config.vision_config.to_json_string(), str(config.vision_feature_layer),
                         str(config.vision_feature_select_strategy)))
    key = (geometry, deployment.key)
    if key not in _COUNTS:
        stages = PreLLM(probe_shell(config), deployment)
        _refuse_out_of_range(stages, deployment)
        counts = sorted({len(k) for k in stages(probe_images(config))[1]})
        stages.compiled.remove()
        _COUNTS[key] = one_count(stages, counts, "each image")
    return _COUNTS[key]


def one_count(stages: PreLLM, counts: list[int], image: str) -> int:
    """The one count the probe images of one size kept (`counts`, sorted and distinct), or the refusal at the
    policy: it keeps no token of `image`, or a count that depends on the image."""
    policy = stages.plan.checked.program.policy
    if counts == [0]:
        raise PolicyError.at(f"policy {policy.name} keeps no token of {image}", policy.span,
                             "give it parameters that keep at least one").with_sources(stages.plan.checked.sources)
    if len(counts) != 1:
        raise PolicyError.at(
            f"policy {policy.name} keeps {' or '.join(map(str, counts))} tokens on images of one size: its count "
            "depends on the image, but vLLM sizes each image's placeholders before the tower runs", policy.span,
            _COUNT_HINT).with_sources(stages.plan.checked.sources)
    return counts[0]


class RequestError(PolicyError, ValueError):
    """A request's `mm_processor_kwargs` budget that the deployment cannot serve: that request fails (a ValueError,
    which vLLM's server answers with 400), the engine serves the others."""


def request_count(config: Any, found: Deployment, entry: object) -> tuple[Deployment, int]:
    """A request's deployment (`entry`: its `mm_processor_kwargs` parameter values in place of the deployment's) and
    the tokens each image keeps under it, refused where it keeps more than `found` (vLLM sized its encoder budget
    and memory profile by the deployment's count): a request may narrow the budget, not widen it."""
    try:
        request = narrowed(found, entry)
        count = kept_count(config, request)
    except PolicyError as error:
        raise RequestError(error.diagnostics) from None
    limit = kept_count(config, found)
    if count > limit:
        values = ", ".join(f"{name}={value}" for name, value in sorted(dict(entry or {}).items()))
        raise RequestError.at(f"mm_processor_kwargs {KEY} ({values}) keeps {count} tokens of each image, more than "
                              f"the {limit} the deployment keeps", None,
                              f"a request may narrow the deployment's budget, not widen it: ask for at most {limit}")
    return request, count


__all__ = ["SERVABLE", "PreLLM", "RequestError", "kept_count", "one_count", "refuse_unservable", "request_count"]
