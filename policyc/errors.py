"""User-facing errors: every problem in a policy is a `PolicyError` that points at the source.

Rendered form (one block per diagnostic)::

    fastv.tokpol:4:31: error: unknown token set 'visoin'
        keep top 50% of visoin by attention(last -> vision)
                        ^^^^^^
    hint: did you mean 'vision'?
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Span:
    """A region of a source file; lines and columns are 1-based, `end_column` is exclusive."""

    file: str
    line: int
    column: int
    end_line: int
    end_column: int


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Span | None = None
    hint: str | None = None
    source: str | None = None

    def render(self) -> str:
        where = f"{self.span.file}:{self.span.line}:{self.span.column}: " if self.span else ""
        lines = [f"{where}error: {self.message}"]
        if self.span is not None and self.source is not None:
            source_lines = self.source.split("\n")
            if 0 < self.span.line <= len(source_lines):
                text = source_lines[self.span.line - 1].expandtabs(1)
                width = (
                    self.span.end_column - self.span.column
                    if self.span.end_line == self.span.line
                    else len(text) - self.span.column + 1
                )
                lines.append(f"    {text}")
                lines.append("    " + " " * (self.span.column - 1) + "^" * max(1, width))
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


@dataclass
class PolicyError(Exception):
    """One or more problems in a policy; `str()` renders them all, compiler-style."""

    diagnostics: list[Diagnostic] = field(default_factory=list)

    @classmethod
    def at(cls, message: str, span: Span | None, hint: str | None = None, source: str | None = None) -> PolicyError:
        return cls([Diagnostic(message, span, hint, source)])

    def with_source(self, source: str) -> PolicyError:
        """The same error with `source` attached to diagnostics that lack it (for the caret line)."""
        return type(self)([
            d if d.source is not None else Diagnostic(d.message, d.span, d.hint, source) for d in self.diagnostics
        ])

    def with_sources(self, sources: dict[str, str]) -> PolicyError:
        """The same error with each diagnostic's source looked up by its span's file name."""
        return type(self)([
            d if d.source is not None or d.span is None or d.span.file not in sources
            else Diagnostic(d.message, d.span, d.hint, sources[d.span.file])
            for d in self.diagnostics
        ])

    def __str__(self) -> str:
        return "\n\n".join(d.render() for d in self.diagnostics)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to `name`, if any is similar enough to suggest."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def suggestion(name: str, candidates: Sequence[str], what: str) -> str:
    """A hint naming the closest valid name, or listing the valid names when none is close."""
    best = closest(name, candidates)
    if best is not None:
        return f"did you mean '{best}'?"
    listed = ", ".join(sorted(candidates)[:12])
    more = ", ..." if len(candidates) > 12 else ""
    return f"valid {what}: {listed}{more}" if candidates else f"no {what} are defined here"
