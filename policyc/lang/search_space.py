"""Searches over policies: the checked form of a `search` block, and the points a search proposes.

    search budget_front {
      choose { fastv, pyramiddrop }
      fastv.ratio in [5%, 50%]      # narrows (or gives) a parameter's domain
      fastv.rows = last             # fixes a parameter for the whole search
    }

checks into a `CheckedSearch`: the candidate policies (checked), one `SearchDimension` per parameter
with a domain (the search's narrowed one, else the one its policy declares), and the fixed values.
`CheckedSearch.assignments` turns one sampled point into what `compile_model` takes, and
`concrete_policy_text` writes that point as a self-contained policy file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from policyc.errors import PolicyError, Span, suggestion
from policyc.lang import ir
from policyc.lang.build import parse
from policyc.lang.check import CheckedPolicy, _check_percent, _Collector, _unique, check_program
from policyc.lang.printer import domain_text, print_expr, print_file
from policyc.lang.resolve import Namespace, resolve

Literal = ir.Number | ir.Percent | ir.String | ir.Name
Domain = ir.RangeDomain | ir.ChoiceDomain


@dataclass(frozen=True)
class SearchDimension:
    """One searchable parameter of one candidate: `param` is its qualified name (`ratio`, `fastv.ratio`)."""

    policy: str  # the candidate policy, as `choose` names it
    param: str
    domain: Domain  # the search's narrowed domain, else the declared one
    default: Literal  # the declared default, or the value of `domain` nearest to it (see `nearest`)

    def literal(self, sampled: int | float | str) -> Literal:
        """The IR value of what a sampler proposes: a number for a range (the number of a percentage: 25 for
        25%) at the range's precision (`at_precision`), or a choice's printed text (`print_expr(option)`:
        `last`, `16`, `"text"`)."""
        name = f"{self.policy}.{self.param}"
        if isinstance(self.domain, ir.ChoiceDomain):
            texts = [print_expr(option) for option in self.domain.options]
            if str(sampled) not in texts:
                raise PolicyError.at(f"'{sampled}' is not a choice of '{name}'", None, suggestion(str(sampled), texts,
                                                                                                 "choices"))
            return self.domain.options[texts.index(str(sampled))]
        if isinstance(sampled, bool) or not isinstance(sampled, int | float):
            raise PolicyError.at(f"'{name}' takes a number from its range {_bounds(self.domain)}, not {sampled!r}",
                                 None)
        whole = isinstance(self.default, ir.Number) and isinstance(self.default.value, int)
        if isinstance(sampled, int) or (whole and sampled.is_integer()):
            return type(self.domain.low)(value=int(sampled))
        return type(self.domain.low)(value=at_precision(sampled, self.domain))


@dataclass(frozen=True)
class CheckedSearch:
    """A checked `search` block (or `space_from_policies`): candidates, dimensions and fixed values."""

    name: str
    candidates: tuple[CheckedPolicy, ...]  # in `choose` order
    dimensions: tuple[SearchDimension, ...]  # every parameter with a domain of every candidate, minus fixed ones
    fixed: tuple[tuple[str, str, Literal], ...]  # (policy, param, value)
    span: Span | None = None
    names: tuple[str, ...] = ()  # the candidates as `choose` names them (`lib.fastv`); default: policy names
    title: str | None = None
    description: str | None = None

    def __post_init__(self) -> None:
        if not self.names:
            object.__setattr__(self, "names", tuple(c.program.policy.name for c in self.candidates))

    def candidate(self, name: str) -> CheckedPolicy:
        if name not in self.names:
            raise PolicyError.at(f"'{name}' is not a candidate of search '{self.name}'", self.span,
                                 suggestion(name, self.names, "candidates"))
        return self.candidates[self.names.index(name)]

    def assignments(self, policy: str, values: Mapping[str, ir.Expr]) -> dict[str, ir.Expr]:
        """The fixed values of `policy` plus `values` (sampled), ready for `compile_model(model, checked,
        assignments)`; raises `PolicyError` for a value outside its dimension's domain."""
        self.candidate(policy)
        fixed: dict[str, ir.Expr] = {param: value for owner, param, value in self.fixed if owner == policy}
        dimensions = {d.param: d for d in self.dimensions if d.policy == policy}
        for name, value in values.items():
            if name in fixed:
                raise PolicyError.at(f"'{policy}.{name}' is fixed to {print_expr(fixed[name])} in search "
                                     f"'{self.name}'", self.span)
            if name not in dimensions:
                raise PolicyError.at(f"'{policy}' has no dimension '{name}' in search '{self.name}'", self.span,
                                     suggestion(name, sorted(dimensions), "dimensions"))
            dimension = dimensions[name]
            problem = value_problem(f"{policy}.{name}", value, dimension.default, dimension.domain)
            if problem is not None:
                raise PolicyError.at(problem[0], self.span, problem[1])
        return {**fixed, **values}


def space_from_policies(policies: Sequence[CheckedPolicy], name: str = "space") -> CheckedSearch:
    """A search over `policies` with their declared domains (a file with no search block, or a standard-library
    policy): every parameter with a domain is a dimension."""
    names = [c.program.policy.name for c in policies]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise PolicyError.at(f"two candidate policies are named '{twice}'", None, "search over distinct policies")
    dimensions = tuple(d for c in policies for d in _dimensions(c.program.policy.name, c, {}, set()))
    return CheckedSearch(name, tuple(policies), dimensions, ())


# ---------------------------------------------------------------- values and domains


def searchable_params(checked: CheckedPolicy) -> dict[str, ir.Param]:
    """Every parameter a search (or `--param`) may set, by qualified name: those a `use` does not override."""
    found: dict[str, ir.Param] = {}
    for scope in checked.program.scopes:
        for param in scope.policy.params:
            if param.name not in scope.overrides:
                found.setdefault(scope.qualified(param.name), param)
    return found


def _text(value: ir.Node) -> str:
    return print_expr(value)  # type: ignore[arg-type]


def _bounds(domain: Domain) -> str:
    return domain_text(domain).removeprefix("in ")


def value_problem(name: str, value: ir.Expr, default: Literal, domain: Domain | None) -> tuple[str, str] | None:
    """Why `value` cannot be parameter `name`'s, with a hint, or None: it must be of its default's kind (the
    check `--param` values get) and lie in `domain`."""
    whole = isinstance(default, ir.Number) and isinstance(default.value, int)
    if type(value) is not type(default) or (whole and not isinstance(value.value, int)):  # type: ignore[union-attr]
        kind = "whole numbers" if whole else {ir.Number: "numbers", ir.Percent: "percentages",
                                              ir.String: '"strings"', ir.Name: "words"}[type(default)]
        return f"'{name}' holds values like {_text(default)}, not {_text(value)}", f"write one of its {kind}"
    if isinstance(value, ir.Percent) and not 0 <= value.value <= 100:
        return f"percentage {_text(value)} is outside 0%..100%", "write a share between 0% and 100%"
    if domain is not None and not in_domain(value, domain):
        if isinstance(domain, ir.ChoiceDomain):
            return f"{_text(value)} is not one of the choices {_bounds(domain)} of '{name}'", \
                f"pick one of {_bounds(domain)}"
        return f"{_text(value)} is outside the range {_bounds(domain)} of '{name}'", \
            f"pick a value within {_bounds(domain)}"
    return None


def in_domain(value: ir.Expr, domain: Domain | None) -> bool:
    """Whether `value` lies in `domain` (between the bounds of a range, or one of the choices)."""
    if domain is None:
        return True
    if isinstance(domain, ir.ChoiceDomain):
        return any(type(option) is type(value) and option == value for option in domain.options)
    return type(value) is type(domain.low) and domain.low.value <= value.value <= domain.high.value  # type: ignore


def at_precision(value: float, domain: ir.RangeDomain) -> int | float:
    """A sampled number at its range's precision, within the bounds: on the step grid of a stepped range (whole
    numbers where the grid's are), to 3 significant digits on a log range, else to the power of ten at or below
    1/1000 of the range's width ([5%, 50%]: 0.01, so 49.956068 becomes 49.96). Rounding happens when a value is
    sampled, so the value a trial compiles is the value it prints and writes."""
    low, high = domain.low.value, domain.high.value
    if domain.step is not None:
        return nearest(type(domain.low)(value=value), domain).value  # type: ignore[arg-type,return-value]
    digits = -math.floor(math.log10((high - low) / 1000))
    number = float(f"{value:.3g}") if domain.log else round(value, digits)
    return float(min(max(number, low), high))


def nearest(value: Literal, domain: Domain) -> Literal:
    """`value` when it lies in `domain` (on its step grid), else the closest value that does (a choice
    domain's first option when `value` is none of them)."""
    if isinstance(domain, ir.ChoiceDomain):
        return value if in_domain(value, domain) else domain.options[0]
    low, high = domain.low.value, domain.high.value
    if type(value) is not type(domain.low):
        return domain.low
    number = min(max(value.value, low), high)  # type: ignore[union-attr]
    if domain.step is not None:
        step = domain.step.value
        number = low + round((number - low) / step) * step
        number = number - step if number > high else number
        number = number if isinstance(number, int) else float(f"{number:.12g}")
    return value if number == value.value else type(domain.low)(value=number)  # type: ignore[union-attr]


# ---------------------------------------------------------------- checking a search block


def check_search(search: ir.Search, namespace: Namespace, own: Mapping[int, CheckedPolicy | None],
                 checked_cache: dict[int, CheckedPolicy]) -> CheckedSearch | None:
    """Check one search of a file. `own` holds the file's policies by `id` (None: failed its own check, already
    reported; the search is then not checked further). Raises `PolicyError` listing every problem."""
    _unique([(m.key, m.span) for m in search.meta], "metadata field")
    choose = search.choose
    if choose is None:
        raise PolicyError.at(f"search '{search.name}' has no `choose`", search.span,
                             "name the candidate policies: choose { fastv, pyramiddrop }")
    _unique([(name.id, name.span) for name in choose.policies], "candidate")
    collect = _Collector()
    found = [collect.run(_candidate, name, namespace, own, checked_cache) for name in choose.policies]
    collect.raise_if_any()
    if any(c is None for c in found):
        return None
    candidates = dict(zip((n.id for n in choose.policies), found, strict=True))
    narrowed: dict[tuple[str, str], Domain] = {}
    fixed: dict[tuple[str, str], Literal] = {}
    written: dict[tuple[str, str], ir.SearchParam] = {}
    for item in search.params:
        key = collect.run(_check_search_param, search.name, item, candidates, namespace, written)
        if key is not None:
            written[key] = item  # type: ignore[index]
            if item.domain is not None:
                narrowed[key] = item.domain  # type: ignore[index]
            else:
                fixed[key] = item.value  # type: ignore[index]
    collect.raise_if_any()
    dimensions = tuple(d for name, checked in candidates.items()
                       for d in _dimensions(name, checked, narrowed, set(fixed)))  # type: ignore[arg-type]
    return CheckedSearch(search.name, tuple(candidates.values()), dimensions,  # type: ignore[arg-type]
                         tuple((p, n, v) for (p, n), v in fixed.items()), search.span, tuple(candidates),
                         search.meta_value("title"), search.meta_value("description"))


def _candidate(chosen: ir.Name, namespace: Namespace, own: Mapping[int, CheckedPolicy | None],
               checked_cache: dict[int, CheckedPolicy]) -> CheckedPolicy | None:
    """The checked policy `choose` names: the file's own, an imported one (`lib.p` for `import ... as lib`)
    or a standard-library one."""
    name, span = chosen.id, chosen.span
    alias, _, inner = name.rpartition(".")
    if alias:
        if alias not in namespace.aliases:
            raise PolicyError.at(f"unknown policy '{name}': no file is imported as '{alias}'", span,
                                 suggestion(alias, sorted(namespace.aliases), "import aliases"))
        policy = namespace.aliases[alias].get(inner)
        if policy is None:
            raise PolicyError.at(f"no policy '{inner}' in the file imported as '{alias}'", span,
                                 suggestion(inner, sorted(namespace.aliases[alias]), "policies there"))
    else:
        policy = namespace.get(name)
        if policy is None:
            raise PolicyError.at(f"unknown policy '{name}' in `choose`", span,
                                 suggestion(name, namespace.names(), "policies"))
    if id(policy) in own:
        return own[id(policy)]
    if id(policy) not in checked_cache:
        loader = namespace.loader
        checked = check_program(resolve(policy, loader.namespace_of(policy)))
        checked_cache[id(policy)] = replace(checked, sources=loader.sources)
    return checked_cache[id(policy)]


def _check_search_param(search: str, item: ir.SearchParam, candidates: Mapping[str, CheckedPolicy],
                        namespace: Namespace, written: Mapping[tuple[str, str], ir.SearchParam]) -> tuple[str, str]:
    """Check `policy.param in DOMAIN` or `policy.param = value`; returns (candidate, qualified param)."""
    target = item.target
    prefixes = [".".join(target[:k]) for k in range(len(target) - 1, 0, -1)]
    name = next((p for p in prefixes if p in candidates), None)
    if name is None:
        head = target[0]
        hint = (f"add '{head}' to `choose`" if namespace.get(head) is not None and head not in candidates
                else suggestion(head, sorted(candidates), "candidates"))
        raise PolicyError.at(f"'{head}' is not a candidate of search '{search}'", item.span, hint)
    param_name = ".".join(target[len(name.split(".")):])
    params = searchable_params(candidates[name])
    param = params.get(param_name)
    if param is None:
        raise PolicyError.at(f"policy '{name}' has no parameter '{param_name}'", item.span,
                             suggestion(param_name, sorted(params), "parameters"))
    key = (name, param_name)
    if key in written:
        first = written[key]
        how = "narrowed" if first.domain is not None else "fixed"
        line = f" at line {first.span.line}" if first.span else ""
        raise PolicyError.at(f"'{item.dotted}' is already {how}{line}", item.span,
                             "give a parameter one domain or one value per search")
    if item.domain is not None:
        _check_narrowed(item.dotted, param, item.domain)
    else:
        problem = value_problem(item.dotted, item.value, param.default, param.domain)  # type: ignore[arg-type]
        if problem is not None:
            raise PolicyError.at(problem[0], item.value.span, problem[1])  # type: ignore[union-attr]
    return key


def _check_narrowed(name: str, param: ir.Param, domain: Domain) -> None:
    """A narrowed domain holds values of the parameter's kind, is well formed, and lies in the declared one."""
    default, declared = param.default, param.domain
    values = (domain.low, domain.high) if isinstance(domain, ir.RangeDomain) else domain.options
    if isinstance(domain, ir.RangeDomain):
        if not isinstance(default, ir.Number | ir.Percent):
            raise PolicyError.at(f"'{name}' holds values like {_text(default)}: a range cannot hold them",
                                 domain.span, "write `in {a, b}` for a set of words or strings")
        if domain.step is not None:
            values = (*values, domain.step)
    for value in values:
        _check_percent(value)
        whole = isinstance(default, ir.Number) and isinstance(default.value, int)
        if type(value) is not type(default) or (whole and not isinstance(value.value, int)):  # type: ignore[union-attr]
            raise PolicyError.at(f"'{name}' holds values like {_text(default)}, not {_text(value)}", value.span)
    if isinstance(domain, ir.RangeDomain):
        if domain.low.value >= domain.high.value:
            raise PolicyError.at(f"empty range: {_text(domain.low)} is not below {_text(domain.high)}", domain.span)
        if domain.step is not None and domain.step.value <= 0:
            raise PolicyError.at("a range step must be positive", domain.step.span)
        if domain.log and domain.low.value <= 0:
            raise PolicyError.at("a log range needs a positive lower bound", domain.low.span)
    else:
        _unique([(_text(o), o.span) for o in domain.options], "choice")
    if declared is None:
        return
    if isinstance(declared, ir.ChoiceDomain) and isinstance(domain, ir.RangeDomain):
        raise PolicyError.at(f"'{name}' is declared with the choices {_bounds(declared)}, not a range", domain.span,
                             "narrow it to some of its choices: in {a, b}")
    outside = next((v for v in (domain.low, domain.high) if not in_domain(v, declared)), None) \
        if isinstance(domain, ir.RangeDomain) else next((v for v in domain.options if not in_domain(v, declared)), None)
    if outside is not None:
        raise PolicyError.at(f"{_text(outside)} is outside the declared domain {_bounds(declared)} of '{name}'",
                             outside.span, f"a search narrows a domain: stay within {_bounds(declared)}, or widen "
                                           "it in the policy")


def _dimensions(name: str, checked: CheckedPolicy, narrowed: Mapping[tuple[str, str], Domain],
                fixed: set[tuple[str, str]]) -> list[SearchDimension]:
    found = []
    for param_name, param in searchable_params(checked).items():
        domain = narrowed.get((name, param_name), param.domain)
        if domain is None or (name, param_name) in fixed:
            continue
        default = nearest(param.default, domain)
        found.append(SearchDimension(name, param_name, domain, default))
    return found


# ---------------------------------------------------------------- concrete policies


def concrete_policy_text(checked: CheckedPolicy, assignments: Mapping[str, ir.Expr]) -> str:
    """The canonical, self-contained `.tokpol` of `checked` (see `policyc.artifact.embedded_policy_text`) with
    `assignments` (qualified names, as `compile_model` takes them) written in as the parameters' defaults."""
    from policyc.artifact import POLICY_FILE, embedded_policy_text
    from policyc.lang import check_source

    params = searchable_params(checked)
    root = checked.program.policy.name
    for name, value in assignments.items():
        if name not in params:
            raise PolicyError.at(f"policy '{root}' has no searchable parameter '{name}'", None,
                                 suggestion(name, sorted(params), "parameters"))
        problem = value_problem(name, value, params[name].default, params[name].domain)
        if problem is not None:
            raise PolicyError.at(problem[0], None, problem[1])
    text = embedded_policy_text(checked)
    if not assignments:
        return text
    values: dict[str, dict[str, ir.Expr]] = {}
    for name, value in assignments.items():
        owner, _, param = name.rpartition(".")
        values.setdefault(owner or root, {})[param] = value
    file = parse(text, POLICY_FILE)
    policies = tuple(p.model_copy(update={"params": tuple(
        q.model_copy(update={"default": values[p.name][q.name]}) if q.name in values.get(p.name, {}) else q
        for q in p.params)}) for p in file.policies)
    text = print_file(file.model_copy(update={"policies": policies}))
    check_source(text, POLICY_FILE)  # the values must keep the policy valid (layers, budgets)
    return text


__all__ = ["CheckedSearch", "SearchDimension", "check_search", "concrete_policy_text", "in_domain", "nearest",
           "searchable_params", "space_from_policies", "value_problem"]

