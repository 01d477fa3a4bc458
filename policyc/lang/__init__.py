"""The .tokpol language: parse, check, print. Importing this package does not import torch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from policyc.errors import PolicyError
from policyc.lang.check import CheckedPolicy, check_program
from policyc.lang.resolve import Loader, resolve


def check_source(text: str, name: str = "<string>", loader: Loader | None = None) -> list[CheckedPolicy]:
    """Parse and check every policy in `text`; raises `PolicyError` listing every problem."""
    loader = loader or Loader()
    try:
        file = loader.parse_text(text, name)
        namespace = loader.namespace(file, name)
        names = [(p.name, p.span) for p in file.policies]
        checked, problems = [], []
        for index, policy in enumerate(file.policies):
            if any(n == policy.name for n, _ in names[:index]):
                problems.append(PolicyError.at(f"duplicate policy '{policy.name}'", policy.span))
                continue
            try:
                checked.append(replace(check_program(resolve(policy, namespace)), sources=loader.sources))
            except PolicyError as error:
                problems.append(error)
        if problems:
            raise PolicyError([d for p in problems for d in p.diagnostics])
        return checked
    except PolicyError as error:
        raise error.with_sources(loader.sources) from None


def check_path(path: str | Path, loader: Loader | None = None) -> list[CheckedPolicy]:
    loader = loader or Loader()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PolicyError.at(f"cannot read {path}: {getattr(error, 'strerror', None) or error}", None) from None
    return check_source(text, str(path), loader)


def check_stdlib(loader: Loader | None = None) -> dict[str, CheckedPolicy]:
    """Every standard-library policy, checked, by policy name."""
    from policyc.resources import stdlib_files

    loader = loader or Loader()
    found: dict[str, CheckedPolicy] = {}
    for stem, resource in stdlib_files().items():
        for checked in check_source(resource.read_text(encoding="utf-8"), f"<stdlib>/{stem}.tokpol", loader):
            found[checked.program.policy.name] = checked
    return found


__all__ = ["CheckedPolicy", "Loader", "PolicyError", "check_path", "check_source", "check_stdlib"]
