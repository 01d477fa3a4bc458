"""Language-level signatures of everything a policy can name: signals, functions, selectors,
merges, schedules, cache policies, token sets, hook points and position modes.

A `Spec` says what a name means to the checker (its options, where it is valid, what it returns)
and carries the one-line description that `policyc list` prints. The runtime implementations
(torch) live in `passes/` and register under the same names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from policyc.errors import PolicyError, Span, suggestion

StageKind = Literal["encoder", "projector", "llm", "decode"]
ALL_STAGES: frozenset[StageKind] = frozenset({"encoder", "projector", "llm"})

# What an expression evaluates to; the checker infers one of these for every expression.
ValueType = Literal[
    "number",     # a scalar: 0.5, a param, size(set)
    "count",      # a whole number of tokens: 64
    "percent",    # a share of a set's current size: 8%
    "schedule",   # a per-layer amount: geometric(0.5), [300, 200, 110], mass(0.97)
    "score",      # one value per token
    "feature",    # one vector per token (for similarities)
    "condition",  # one boolean per token
    "set",        # a token set
    "flow",       # queries -> keys
    "range",      # a..b: an inclusive range of layers, as an option's value
    "enum",       # a bare word from a fixed list, e.g. heads=mean
    "text",       # a "string"
]


@dataclass(frozen=True)
class Option:
    """One argument of a spec. `accepts` lists the value types allowed; `choices` the words for enums."""

    name: str
    accepts: tuple[ValueType, ...]
    summary: str
    default: str | None = None  # printed form; None means required
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    integer: bool = False
    positional: bool = False

    @property
    def required(self) -> bool:
        return self.default is None


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str
    summary: str
    options: tuple[Option, ...] = ()
    stages: frozenset[StageKind] = ALL_STAGES
    returns: ValueType = "score"
    paper: str = ""
    by: ValueType | None = None  # for selectors and merges: what `by` takes (None: no `by`)
    into: bool = False  # for merges: whether `into <set>` is required
    multi_layer: bool = False  # for schedules: the amount moves across the stage's layers (one layer: refused)
    # What policyc's runtime implements of this spec (an operator's `spec`; the checker reads none of it): the stage
    # kinds it runs in (None: all of `stages`) and the options it refuses for now; elsewhere, or with those options,
    # compiling fails with "not implemented by policyc's runtime yet" at the policy's line.
    runs: frozenset[StageKind] | None = None
    unimplemented: frozenset[str] = frozenset()
    # What it reads at projector.output besides the tokens: "grid", one patch grid for every image (geometric
    # operators); "question", the prompt's text. Families whose projector stages lack it refuse it at compile time.
    needs: frozenset[Literal["grid", "question"]] = frozenset()

    def option(self, name: str) -> Option | None:
        return next((o for o in self.options if o.name == name), None)

    def runs_in(self, stage: StageKind) -> bool:
        """Whether the runtime implements this operator in a stage of this kind."""
        return stage in (self.stages if self.runs is None else self.runs)

    @property
    def implemented(self) -> frozenset[str]:
        """The options the runtime honours: the declared ones, less `unimplemented`."""
        return frozenset(o.name for o in self.options) - self.unimplemented

    def signature(self) -> str:
        """`attention(flow, heads=mean, ...)` for listings."""
        parts = [o.name if o.required else f"{o.name}={o.default}" for o in self.options]
        return f"{self.name}({', '.join(parts)})" if parts else self.name


@dataclass
class Registry:
    """Specs of one kind, by name; unknown names fail with the closest valid name.

    Operators (signals, selectors, merges, caches, ...) declare their spec next to their implementation and
    register it here when `policyc.operators` loads them (built-ins and plug-ins), on the first lookup."""

    kind: str
    noun: str
    plural: str = ""  # the listing's name when not `kind + "s"`
    entries: dict[str, Spec] = field(default_factory=dict)
    packages: dict[str, str] = field(default_factory=dict)  # name -> the package that declared it (plug-ins)
    operators: bool = False  # filled by operator classes (built-ins and plug-ins), not by the language itself

    @property
    def specs(self) -> dict[str, Spec]:
        """Every spec by name, operators loaded."""
        _load_operators()
        return self.entries

    @property
    def title(self) -> str:
        """`signals`, `positions`: how `policyc list` names this registry."""
        return self.plural or self.kind + "s"

    def add(self, *specs: Spec, package: str = "policyc") -> None:
        for spec in specs:
            if spec.name in self.entries:
                raise ValueError(f"duplicate {self.kind} spec {spec.name!r}")
            self.entries[spec.name] = spec
            self.packages[spec.name] = package

    def package(self, name: str) -> str:
        """The package that declared `name` ("policyc" for built-ins)."""
        _load_operators()
        return self.packages.get(name, "policyc")

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __iter__(self) -> Iterator[Spec]:
        """The specs in listing order: operators by name, policyc's own first (not in the order files import)."""
        if not self.operators:
            return iter(self.specs.values())
        return iter(sorted(self.specs.values(), key=lambda s: (self.packages.get(s.name) != "policyc", s.name)))

    def names(self) -> list[str]:
        return list(self.specs)

    def get(self, name: str, span: Span | None) -> Spec:
        spec = self.specs.get(name)
        if spec is None:
            raise PolicyError.at(f"unknown {self.noun} '{name}'", span, suggestion(name, self.names(), f"{self.noun}s"))
        return spec


def _load_operators() -> None:
    """Register the built-in operators and the installed plug-ins (once; see policyc/operators)."""
    from policyc.operators import load

    load()
