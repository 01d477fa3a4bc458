"""The .tokpol language: parse, check, print. Importing this package does not import torch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from policyc.errors import PolicyError
from policyc.lang.check import CheckedPolicy, check_program
from policyc.lang.resolve import Loader, resolve
from policyc.lang.search_space import (
    CheckedSearch,
    SearchDimension,
    check_search,
    concrete_policy_text,
    space_from_policies,
)


def check_source(text: str, name: str = "<string>", loader: Loader | None = None) -> list[CheckedPolicy]:
    """Parse and check every policy and search in `text`; returns the policies. Raises `PolicyError` listing
    every problem."""
    return _check_file(text, name, loader)[0]


def check_searches(text: str, name: str = "<string>", loader: Loader | None = None) -> list[CheckedSearch]:
    """Parse and check every policy and search in `text`; returns the searches (none for a file without
    `search` blocks). Raises `PolicyError` listing every problem."""
    return _check_file(text, name, loader)[1]


def _check_file(text: str, name: str, loader: Loader | None) -> tuple[list[CheckedPolicy], list[CheckedSearch]]:
    loader = loader or Loader()
    try:
        file = loader.parse_text(text, name)
        namespace = loader.namespace(file, name)
        names = [(p.name, p.span) for p in file.policies]
        checked, problems = [], []
        own: dict[int, CheckedPolicy | None] = {}
        for index, policy in enumerate(file.policies):
            own[id(policy)] = None
            if any(n == policy.name for n, _ in names[:index]):
                problems.append(PolicyError.at(f"duplicate policy '{policy.name}'", policy.span))
                continue
            try:
                checked.append(replace(check_program(resolve(policy, namespace)), sources=loader.sources))
                own[id(policy)] = checked[-1]
            except PolicyError as error:
                problems.append(error)
        searches: list[CheckedSearch] = []
        cache: dict[int, CheckedPolicy] = {}
        for index, search in enumerate(file.searches):
            if search.name in {n for n, _ in names} | {s.name for s in file.searches[:index]}:
                problems.append(PolicyError.at(f"duplicate name '{search.name}'", search.span,
                                               "give every policy and search of a file its own name"))
                continue
            try:
                found = check_search(search, namespace, own, cache)
            except PolicyError as error:
                problems.append(error)
                continue
            if found is not None:
                searches.append(found)
        if problems:
            raise PolicyError([d for p in problems for d in p.diagnostics])
        return checked, searches
    except PolicyError as error:
        raise error.with_sources(loader.sources) from None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError.at(f"cannot read {path}: {getattr(error, 'strerror', None) or error}", None) from None


def check_path(path: str | Path, loader: Loader | None = None) -> list[CheckedPolicy]:
    return check_source(_read(path), str(path), loader)


def check_search_path(path: str | Path, loader: Loader | None = None) -> list[CheckedSearch]:
    return check_searches(_read(path), str(path), loader)


def check_stdlib(loader: Loader | None = None) -> dict[str, CheckedPolicy]:
    """Every standard-library policy, checked, by policy name."""
    from policyc.resources import stdlib_files

    loader = loader or Loader()
    found: dict[str, CheckedPolicy] = {}
    for stem, resource in stdlib_files().items():
        for checked in check_source(resource.read_text(encoding="utf-8"), f"<stdlib>/{stem}.tokpol", loader):
            found[checked.program.policy.name] = checked
    return found


__all__ = ["CheckedPolicy", "CheckedSearch", "Loader", "PolicyError", "SearchDimension", "check_path",
           "check_search_path", "check_searches", "check_source", "check_stdlib", "concrete_policy_text",
           "space_from_policies"]
