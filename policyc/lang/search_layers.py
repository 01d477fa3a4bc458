"""Layer parameters a model bounds. A whole-number parameter written as a stage's layer index (`llm.layer[layer]`,
`encoder.layer[0..last]`) names a layer of that hook only below its depth: FastV's `layer in [0, 15]` on an
8-layer LLM would spend trials on layers that do not exist. `cap_layers` narrows such a search dimension to the
layers the model has (`policy_search.search` does, and says so), and fails, naming the parameter, when none of
its values fits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.lang.check import CheckedPolicy
from policyc.lang.layers import DEPTH
from policyc.lang.printer import domain_text
from policyc.lang.search_space import CheckedSearch, SearchDimension, nearest


def layer_params(checked: CheckedPolicy) -> dict[str, str]:
    """Qualified names of the parameters of `checked` written as a whole layer index (a list item or a range's
    end), each with the kind of hook it indexes (`llm` or `encoder`)."""
    found: dict[str, str] = {}
    for plan in checked.stages:
        hook, scope = plan.placed.stage.hook, plan.placed.scope
        if not isinstance(hook.layers, ir.LayerList):
            continue
        params = {p.name for p in scope.policy.params}
        for item in hook.layers.items:
            for part in (item.start, item.stop):
                if isinstance(part, ir.Name) and part.id != DEPTH and part.id in params:
                    found[scope.qualified(part.id)] = plan.hook.stage_kind
    return found


def cap_layers(space: CheckedSearch, depths: Mapping[str, int]) -> tuple[CheckedSearch, list[str]]:
    """`space` with every layer dimension (see `layer_params`) narrowed to the layers its hook has on the model
    (`depths`: layer counts by hook kind, `llm` and `encoder`), and a line saying so per narrowed dimension."""
    dimensions: list[SearchDimension] = []
    notes: list[str] = []
    for dimension in space.dimensions:
        kind = layer_params(space.candidate(dimension.policy)).get(dimension.param)
        if kind is not None and kind in depths:
            narrowed = _within(dimension, depths[kind])
            if narrowed != dimension.domain:
                notes.append(f"{dimension.policy}.{dimension.param} searched {domain_text(narrowed)}, not "
                             f"{domain_text(dimension.domain).removeprefix('in ')}: the model's "
                             f"{'LLM' if kind == 'llm' else 'vision encoder'} has {depths[kind]} layers")
                dimension = replace(dimension, domain=narrowed, default=nearest(dimension.default, narrowed))
        dimensions.append(dimension)
    return replace(space, dimensions=tuple(dimensions)), notes


def _within(dimension: SearchDimension, depth: int) -> ir.RangeDomain | ir.ChoiceDomain:
    """The values of the dimension's domain that are layers of a `depth`-layer hook (negative ones count from
    the end); an error if none is."""
    domain = dimension.domain

    def fits(value: object) -> bool:
        return isinstance(value, int) and -depth <= value < depth

    if isinstance(domain, ir.ChoiceDomain):
        options = tuple(o for o in domain.options if fits(getattr(o, "value", None)))
        if options:
            return domain.model_copy(update={"options": options})
    elif fits(domain.low.value):
        step = domain.step.value if domain.step is not None else 1
        if not isinstance(step, int) or not isinstance(domain.high.value, int):
            return domain
        last = min(domain.high.value, domain.low.value + (depth - 1 - domain.low.value) // step * step)
        return domain.model_copy(update={"high": ir.Number(value=last)})
    raise PolicyError.at(f"{dimension.policy}.{dimension.param} is searched {domain_text(domain)}, but the model "
                         f"has {depth} layers there ({-depth} to {depth - 1})", domain.span,
                         f"narrow it in a search block: {dimension.policy}.{dimension.param} in [0, {depth - 1}]")


__all__ = ["cap_layers", "layer_params"]
