"""Count parameters a model bounds. A whole-number parameter used only as the amount of token selections
(`top dominant of vision`, `stride contextual of rest`, `keep top [early, middle, late] of vision`) keeps every
token from the number of image tokens a prompt holds on: on a model whose prompts hold 144 image tokens,
`dominant=312` and `dominant=228` both keep all 144. `cap_counts` narrows such a search dimension to that number
(`policy_search.search` does, with the most image tokens an evaluated prompt of the unmodified model held), so
trials are not spent on values that all measure the same policy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from policyc.lang import ir
from policyc.lang.check import CheckedPolicy
from policyc.lang.printer import domain_text
from policyc.lang.search_space import CheckedSearch, SearchDimension, nearest


def count_params(checked: CheckedPolicy) -> set[str]:
    """Qualified names of the parameters of `checked` used only as selection amounts (a bare name, or an item of
    a per-layer list); a parameter also used in any other way (arithmetic, layers, options, `use` overrides) is
    not one."""
    amounts: Counter[str] = Counter()
    uses: Counter[str] = Counter()
    for scope in checked.program.scopes:
        params = {p.name for p in scope.policy.params}
        nodes = [node for stage in scope.policy.stages for node in stage.walk()]
        nodes += [node for use in scope.policy.uses for kwarg in use.overrides for node in kwarg.value.walk()]
        for node in nodes:
            if isinstance(node, ir.Select):
                items = node.amount.items if isinstance(node.amount, ir.ListExpr) else (node.amount,)
                amounts.update(scope.qualified(i.id) for i in items if isinstance(i, ir.Name) and i.id in params)
            elif isinstance(node, ir.Name) and node.id in params:
                uses[scope.qualified(node.id)] += 1
    return {name for name, count in amounts.items() if count == uses[name]}


def cap_counts(space: CheckedSearch, most: float | None) -> tuple[CheckedSearch, list[str]]:
    """`space` with every count dimension (whole numbers, see `count_params`) whose range reaches past `most`
    capped at it, and a line saying so per capped dimension; `space` itself where `most` is unknown (None)."""
    if not most:
        return space, []
    most = int(most)
    counts = {name: count_params(space.candidate(name)) for name in space.names}
    dimensions: list[SearchDimension] = []
    notes: list[str] = []
    for dimension in space.dimensions:
        domain = dimension.domain
        if dimension.param in counts[dimension.policy] and _whole(domain) and domain.high.value > most:  # type: ignore[union-attr]
            capped = _capped(domain, most)
            notes.append(f"{dimension.policy}.{dimension.param} searched {domain_text(capped)}, not "
                         f"{domain_text(domain).removeprefix('in ')}: a prompt holds at most {most} image tokens, "
                         "and a larger count keeps them all")
            dimension = replace(dimension, domain=capped, default=nearest(dimension.default, capped))
        dimensions.append(dimension)
    return replace(space, dimensions=tuple(dimensions)), notes


def _whole(domain: ir.RangeDomain | ir.ChoiceDomain) -> bool:
    """A range of whole numbers (counts), not of percentages."""
    return isinstance(domain, ir.RangeDomain) and isinstance(domain.low, ir.Number) and all(
        isinstance(v.value, int) for v in (domain.low, domain.high, domain.step or domain.low))


def _capped(domain: ir.RangeDomain, most: int) -> ir.RangeDomain:
    """The range up to `most` (its last step at or below it); a range starting at or past it: its low end only."""
    low = domain.low.value
    step = domain.step.value if domain.step is not None else 1
    high = max(low, low + (most - low) // step * step)  # type: ignore[operator]
    return domain.model_copy(update={"high": ir.Number(value=high)})


__all__ = ["cap_counts", "count_params"]
