"""Loading policy files and resolving `import` and `use` into a `Program`: every stage a policy
runs, each with the scope (policy + parameter overrides) its names are looked up in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from policyc.errors import PolicyError, Span, suggestion
from policyc.lang import ir
from policyc.lang.build import parse
from policyc.resources import stdlib_files

STDLIB_PREFIX = "<stdlib>/"


@dataclass(frozen=True, eq=False)
class Scope:
    """Where a stage's names resolve: its policy's params and sets, with `use` overrides applied.

    `overrides` maps a param of `policy` to an expression evaluated in `parent`.
    """

    policy: ir.Policy
    label: str
    overrides: dict[str, ir.Expr] = field(default_factory=dict)
    parent: Scope | None = None

    def qualified(self, name: str) -> str:
        """`fastv.ratio` for a param of a used policy, `ratio` for the policy's own."""
        return name if self.parent is None else f"{self.label}.{name}"

    def value(self, name: str, assignments: Mapping[str, ir.Expr] | None = None) -> ir.Expr | None:
        """The literal a parameter holds: a search assignment (by qualified name), else the `use`
        override (evaluated in the using scope), else its default. None if `name` is no parameter."""
        param = next((p for p in self.policy.params if p.name == name), None)
        if param is None:
            return None
        if assignments and self.qualified(name) in assignments:
            return assignments[self.qualified(name)]
        override = self.overrides.get(name)
        if override is None:
            return param.default
        if isinstance(override, ir.Name) and self.parent is not None:
            return self.parent.value(override.id, assignments) or override
        return override


@dataclass(frozen=True)
class PlacedStage:
    stage: ir.Stage
    scope: Scope


@dataclass(frozen=True)
class Program:
    """A policy with its `use`s expanded: the stages it runs and the params that tune them."""

    policy: ir.Policy
    stages: tuple[PlacedStage, ...]
    scopes: tuple[Scope, ...]


@dataclass
class Namespace:
    """The policies a `use` in one file can name: the file's own, its imports, the stdlib."""

    loader: Loader
    local: dict[str, ir.Policy]
    aliases: dict[str, dict[str, ir.Policy]]

    def get(self, name: str) -> ir.Policy | None:
        return self.local.get(name) or self.loader.stdlib_policy(name)

    def names(self) -> list[str]:
        return sorted({*self.local, *self.loader.stdlib()})


class Loader:
    """Reads policy files once, resolves imports relative to the importing file, knows the stdlib.

    Keeps every source text read, so errors in any file render with their source line.
    """

    def __init__(self) -> None:
        self.sources: dict[str, str] = {}
        self._files: dict[str, ir.PolicyFile] = {}
        self._file_of: dict[int, str] = {}  # id(policy) -> the file it was written in
        self._namespaces: dict[str, Namespace] = {}
        self._stdlib: dict[str, ir.Policy] | None = None

    def parse_text(self, text: str, name: str) -> ir.PolicyFile:
        self.sources[name] = text
        if name not in self._files:
            file = self._files[name] = parse(text, name)
            self._file_of.update({id(p): name for p in file.policies})
        return self._files[name]

    def load(self, path: str | Path) -> ir.PolicyFile:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError.at(f"cannot read {path}: {getattr(error, 'strerror', None) or error}", None) from None
        return self.parse_text(text, str(path))

    def stdlib(self) -> dict[str, ir.Policy]:
        """Every standard-library policy by name."""
        if self._stdlib is None:
            self._stdlib = {}
            for stem in stdlib_files():
                for policy in self._stdlib_file(stem).policies:
                    self._stdlib.setdefault(policy.name, policy)
        return self._stdlib

    def stdlib_policy(self, name: str) -> ir.Policy | None:
        """One standard-library policy; reads only `<name>.tokpol` when the policy lives there."""
        if self._stdlib is None and name in stdlib_files():
            match = next((p for p in self._stdlib_file(name).policies if p.name == name), None)
            if match is not None:
                return match
        return self.stdlib().get(name)

    def _stdlib_file(self, stem: str) -> ir.PolicyFile:
        resource = stdlib_files()[stem]
        return self.parse_text(resource.read_text(encoding="utf-8"), f"{STDLIB_PREFIX}{stem}.tokpol")

    def namespace_of(self, policy: ir.Policy) -> Namespace:
        """The namespace of the file `policy` was written in (its `use`s resolve there)."""
        name = self._file_of[id(policy)]
        return self.namespace(self._files[name], name)

    def namespace(self, file: ir.PolicyFile, file_name: str) -> Namespace:
        if file_name in self._namespaces:
            return self._namespaces[file_name]
        aliases: dict[str, dict[str, ir.Policy]] = {}
        local: dict[str, ir.Policy] = {}
        for item in file.imports:
            policies = {p.name: p for p in self.load(self._import_target(item, file_name)).policies}
            if item.alias is not None:
                aliases[item.alias] = policies
                continue
            for name, policy in policies.items():
                if name in local and local[name] is not policy:
                    raise PolicyError.at(f"policy '{name}' is imported twice", item.span,
                                         f'import one of the files `as` an alias: import "{item.path}" as lib')
                local[name] = policy
        local.update({p.name: p for p in file.policies})
        self._namespaces[file_name] = Namespace(self, local, aliases)
        return self._namespaces[file_name]

    def _import_target(self, item: ir.Import, file_name: str) -> Path:
        base = Path(file_name).parent if not file_name.startswith("<") else Path.cwd()
        target = (base / item.path).resolve()
        if not target.is_file():
            raise PolicyError.at(f"cannot import '{item.path}': no such file", item.span,
                                 f"paths are relative to the importing file's folder ({base})")
        return target


def resolve(policy: ir.Policy, namespace: Namespace) -> Program:
    """Expand `use` recursively; a policy that uses itself (directly or not) is an error."""
    root = Scope(policy, policy.name)
    stages: list[PlacedStage] = []
    scopes: list[Scope] = [root]
    _expand(root, namespace, (policy.name,), stages, scopes)
    return Program(policy, tuple(stages), tuple(scopes))


def _expand(scope: Scope, namespace: Namespace, chain: tuple[str, ...], stages: list[PlacedStage],
            scopes: list[Scope]) -> None:
    for use in scope.policy.uses:
        used, stage_name = _target(use, namespace)
        if used.name in chain:
            cycle = " -> ".join((*chain, used.name))
            raise PolicyError.at(f"cycle in `use`: {cycle}", use.span, "a policy cannot include itself")
        params = {p.name for p in used.params}
        seen: set[str] = set()
        for override in use.overrides:
            if override.name in seen:
                raise PolicyError.at(f"parameter '{override.name}' is set twice", override.span)
            seen.add(override.name)
            if override.name not in params:
                raise PolicyError.at(f"policy '{used.name}' has no parameter '{override.name}'", override.span,
                                     suggestion(override.name, sorted(params), "parameters"))
        child = Scope(used, used.name, {o.name: o.value for o in use.overrides}, scope)
        scopes.append(child)
        if stage_name is None:
            _expand(child, namespace.loader.namespace_of(used), (*chain, used.name), stages, scopes)
        else:
            stages.append(PlacedStage(_stage(used, stage_name, use.span), child))
    stages.extend(PlacedStage(s, scope) for s in scope.policy.stages)


def _target(use: ir.Use, namespace: Namespace) -> tuple[ir.Policy, str | None]:
    """`use p`, `use p.stage`, or `use alias.p` (a policy of a file imported `as alias`)."""
    if use.policy in namespace.aliases:
        policies = namespace.aliases[use.policy]
        if use.stage is None or use.stage not in policies:
            raise PolicyError.at(f"no policy '{use.stage}' in the file imported as '{use.policy}'", use.span,
                                 suggestion(use.stage or "", sorted(policies), "policies there"))
        return policies[use.stage], None
    used = namespace.get(use.policy)
    if used is None:
        raise PolicyError.at(f"unknown policy '{use.policy}'", use.span,
                             suggestion(use.policy, namespace.names(), "policies"))
    return used, use.stage


def _stage(policy: ir.Policy, name: str, span: Span | None) -> ir.Stage:
    for stage in policy.stages:
        if stage.name == name:
            return stage
    names = sorted(s.name for s in policy.stages if s.name)
    raise PolicyError.at(f"policy '{policy.name}' has no stage named '{name}'", span,
                         suggestion(name, names, "stage names") if names else
                         f"name a stage with `stage <hook> as {name}` in '{policy.name}'")
