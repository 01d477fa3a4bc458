"""Text -> lark tree, with syntax errors turned into `PolicyError`s that point at the source."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from dataclasses import dataclass

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from policyc.errors import PolicyError, Span, closest
from policyc.resources import grammar_text

# Readable names for the grammar's terminals, used in "expected ..." hints.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "PERCENT": "a percentage",
    "STRING": 'a "string"',
    "MINUS": "'-'",
    "ADD_OP": "'+' or '-'",
    "MUL_OP": "'*' or '/'",
    "COMP_OP": "a comparison",
    "$END": "end of file",
}
# Terminals that merely continue an expression: hints list them as "an operator".
_OPERATOR_TERMINALS = {"ADD_OP", "MUL_OP", "COMP_OP", "MINUS", "VBAR", "AMPERSAND", "LSQB", "LPAR", "DOT", "MORETHAN"}


@functools.cache
def lark_parser(selectors: tuple[tuple[str, bool], ...] = ()) -> Lark:
    """The LALR parser; analysed grammar tables are cached on disk, keyed by the grammar's hash. `selectors`:
    plug-in selectors (name, whether it takes `by`), keywords beside the built-in `top`, ..., `stride`."""
    text = _with_selectors(grammar_text(), selectors)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    cache_dir = os.environ.get("POLICYC_CACHE_DIR", os.path.join(tempfile.gettempdir(), "policyc-cache"))
    cache_path = os.path.join(cache_dir, f"tokpol-{digest}.lark-cache")
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError:
        cache_path = None  # type: ignore[assignment]
    options = {"parser": "lalr", "propagate_positions": True, "maybe_placeholders": True}
    if cache_path is not None and os.path.exists(cache_path):
        return Lark(text, cache=cache_path, **options)
    # Strict mode (shift/reduce conflicts and terminal collisions are errors) needs interegular,
    # a build-time check; an installed policyc without it still builds the same tables.
    try:
        import interegular  # noqa: F401

        options["strict"] = True
    except ImportError:
        pass
    return Lark(text, cache=cache_path or False, **options)


@functools.cache
def keywords() -> frozenset[str]:
    """The grammar's keywords (`policy`, `stage`, `top`, `by`, ...)."""
    return frozenset(t.pattern.value for t in lark_parser().terminals
                     if t.pattern.type == "str" and t.pattern.value.isidentifier())


@dataclass(frozen=True)
class Comment:
    line: int
    column: int
    text: str  # everything after '#', right-stripped


def scan_comments(text: str) -> list[Comment]:
    """Every `# ...` comment outside string literals (strings never span lines)."""
    comments = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string = escaped = False
        for column, char in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char == "#":
                comments.append(Comment(number, column + 1, line[column + 1 :].rstrip()))
                break
    return comments


def parse_tree(text: str, file: str) -> Tree:
    """Parse `text` into a lark tree, or raise a `PolicyError` located at the offending token. A syntax error
    first loads the plug-in operators (policyc.operators): when they add selectors, the text is parsed again."""
    selectors = extra_selectors()
    parser = lark_parser(selectors)
    try:
        return parser.parse(text)
    except UnexpectedInput as error:
        from policyc.operators import PluginError, load

        with contextlib.suppress(PluginError):  # reported where an operator is looked up: here the syntax error is
            load()
        if extra_selectors() == selectors:
            raise _syntax_error(error, text, file, parser) from None
    return parse_tree(text, file)


def extra_selectors() -> tuple[tuple[str, bool], ...]:
    """The selectors registered so far (without loading any) beyond the grammar's own keywords (`CORE_SELECTORS`),
    built-in or plug-in, as (name, whether it takes `by`): a new selector is its operator file, not a grammar edit."""
    from policyc.catalog.selectors import SELECTORS

    return tuple(sorted((name, spec.by is not None) for name, spec in SELECTORS.entries.items()
                        if name not in CORE_SELECTORS))


def _with_selectors(grammar: str, selectors: tuple[tuple[str, bool], ...]) -> str:
    """The grammar with each extra selector as a keyword of the selection rule (`by` or not, as declared)."""
    terminals = {name: f"PLUGIN_SELECTOR_{i}" for i, (name, _) in enumerate(selectors)}
    scored = "".join(f" | {terminals[name]}" for name, by in selectors if by)
    plain = "".join(f" | {terminals[name]}" for name, by in selectors if not by)
    grammar = grammar.replace("(TOP | DIVERSE | COVER)", f"(TOP | DIVERSE | COVER{scored})", 1)
    grammar = grammar.replace("(GRID | STRIDE)", f"(GRID | STRIDE{plain})", 1)
    return grammar + "".join(f'\n{terminal}: "{name}"' for name, terminal in terminals.items())


def _describe_terminal(name: str, parser: Lark) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return name.lower()
    return f"'{pattern.value}'" if pattern.type == "str" else name.lower()


def _keyword(name: str, parser: Lark) -> str | None:
    try:
        pattern = parser.get_terminal(name).pattern
    except KeyError:
        return None
    return pattern.value if pattern.type == "str" and pattern.value.isidentifier() else None


def _expected_hint(expected: set[str], parser: Lark) -> str:
    words = sorted({_describe_terminal(t, parser) for t in expected if t not in _OPERATOR_TERMINALS})
    if expected & _OPERATOR_TERMINALS:
        words.append("an operator")
    if not words:
        return ""
    if len(words) > 8:
        words = [*words[:8], "..."]
    return "expected " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1])


def _token_text(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    kind = {"NAME": "name", "NUMBER": "number", "PERCENT": "percentage", "STRING": "string"}.get(token.type)
    return f"{kind} '{token}'" if kind else f"'{token}'"


def _position(value: object) -> int:
    """A 1-based line or column from lark, which uses -1, None or '?' when it has none."""
    return value if isinstance(value, int) and value > 0 else 1


CORE_SELECTORS = ("top", "diverse", "cover", "grid", "stride")  # the keywords of grammar/tokpol.lark's `selection`
_STATEMENTS = ("let", "score", "keep", "drop", "protect", "merge", "positions", "cache")
_CLOSERS = {"{": "}", "(": ")", "[": "]"}


def _unclosed_bracket(text: str) -> tuple[str, int, int] | None:
    """The innermost bracket left open at the end of `text`: (bracket, line, column)."""
    stack: list[tuple[str, int, int]] = []
    for number, line in enumerate(text.split("\n"), start=1):
        in_string = escaped = False
        for column, char in enumerate(line, start=1):
            if in_string:
                escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
            elif char == '"':
                in_string = True
            elif char == "#":
                break
            elif char in _CLOSERS:
                stack.append((char, number, column))
            elif stack and char == _CLOSERS[stack[-1][0]]:
                stack.pop()
    return stack[-1] if stack else None


def _end_span(text: str, file: str) -> Span:
    """Just after the last non-blank character: where a missing closer belongs."""
    lines = text.rstrip().split("\n")
    return Span(file, len(lines), len(lines[-1]) + 1, len(lines), len(lines[-1]) + 2)


def _eof_error(text: str, file: str, expected: set[str], parser: Lark) -> PolicyError:
    span = _end_span(text, file)
    unclosed = _unclosed_bracket(text)
    closers = {"RBRACE", "RPAR", "RSQB"}
    if unclosed is not None and (expected & closers or not expected):
        bracket, line, column = unclosed
        return PolicyError.at(f"unexpected end of file: '{bracket}' at {line}:{column} is never closed", span,
                              f"add '{_CLOSERS[bracket]}'", text)
    return PolicyError.at("unexpected end of file", span, _expected_hint(expected, parser) or None, text)


def _expected_terminals(error: UnexpectedToken) -> set[str]:
    """Terminals the parser would really accept here (lark's `expected` also lists impossible ones)."""
    try:
        return set(error.interactive_parser.accepts()) or set(error.expected)
    except Exception:  # the interactive parser is a diagnostic aid; fall back to lark's own list
        return set(error.expected)


def _syntax_error(error: UnexpectedInput, text: str, file: str, parser: Lark) -> PolicyError:
    line, column = _position(error.line), _position(error.column)
    if isinstance(error, UnexpectedCharacters):
        char = text[error.pos_in_stream] if error.pos_in_stream < len(text) else ""
        span = Span(file, line, column, line, column + 1)
        if char == '"':
            return PolicyError.at("unterminated string", span,
                                  'close it with " on the same line; strings cannot span lines (write \\n)', text)
        hints = {
            "'": 'strings use double quotes: "like this"',
            ";": "statements need no ';', put each on its own line",
            ":": "write `name = value` for options and `let name = ...` for sets",
            "=": "compare with '==', or bind a name with `let name = ...`",
        }
        if char in hints:
            return PolicyError.at(f"unexpected character {char!r}", span, hints[char], text)
        return PolicyError.at(f"{char!r} is not part of the .tokpol language", span,
                              "operators are + - * / | & -> and comparisons; comments start with #", text)
    if isinstance(error, UnexpectedEOF):
        return _eof_error(text, file, set(error.expected), parser)
    if not isinstance(error, UnexpectedToken):  # lark has no fourth kind; say something located anyway
        span = Span(file, line, column, line, column + 1)
        return PolicyError.at("syntax error", span, None, text)
    token = error.token
    expected = _expected_terminals(error)
    if token.type == "$END":
        return _eof_error(text, file, expected, parser)
    end_line, end_column = token.end_line or line, token.end_column or column + len(token)
    span = Span(file, line, column, end_line, end_column)
    message = f"unexpected {_token_text(token)}"
    hint = _expected_hint(expected, parser)
    keywords = {k for t in expected if (k := _keyword(t, parser))}
    previous = (error.token_history or [None])[-1]
    if token.type == "NAME" and keywords and (best := closest(str(token), keywords)):
        hint = f"did you mean '{best}'?"
    elif str(token) == "=" and previous is not None and str(previous) == "=":
        hint = "one '=' sets a value: `param k = 3`, or `fastv.ratio = 25%` in a search"
    elif str(token) == "=":
        hint = "compare with '==', or bind a name with `let name = ...`"
    elif token.type in ("RBRACE", "RPAR", "RSQB") and (unclosed := _unclosed_bracket(text[: token.start_pos])):
        bracket, open_line, open_column = unclosed
        if _CLOSERS[bracket] != str(token):
            closer = _CLOSERS[bracket]
            hint = f"'{bracket}' at {open_line}:{open_column} is never closed; add '{closer}' before '{token}'"
    elif str(token) in _STATEMENTS and "STAGE" in expected:
        hint = f"'{token}' goes inside a stage: stage llm.layer[2] {{ {token} ... }}"
    elif previous is not None and previous.type == "NAME" and token.type in {"NUMBER", "PERCENT", "NAME"}:
        selectors = (*CORE_SELECTORS, *(name for name, _ in extra_selectors()))
        if str(previous) in selectors:
            message = "a selection inside an expression needs parentheses"
            span = Span(file, previous.line or line, previous.column or column, end_line, end_column)
            hint = f"write ({previous} {token} of ... by ...)"
        elif best := closest(str(previous), selectors):
            hint = f"'{previous}' is not a selector; did you mean '{best}'?"
    return PolicyError.at(message, span, hint or None, text)
