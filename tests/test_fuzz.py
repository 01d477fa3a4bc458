"""Fuzzing the front end: whatever text `parse` gets, the only exception that may escape is a located `PolicyError`.

(a) random text over an alphabet biased toward the grammar's characters and keywords;
(b) mutations (delete, insert, duplicate, swap: characters or tokens; truncation) of valid policy text,
    printed from random IR or taken from hand-written files.

A `PolicyError` must render as `<name>.tokpol:<line>:<col>: error: ...` followed by the offending source
line and a caret line under the column. Text that does parse must survive the canonical printer:
`parse(print_file(parse(t))) == parse(t)` and printing is a fixed point.

Every input that ever broke one of these properties is minimised and kept in tests/fuzz_corpus/, and
replayed by `test_corpus_entry`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from strategies import KEYWORDS, example_count, policy_files

from policyc.errors import PolicyError
from policyc.lang.build import parse
from policyc.lang.printer import print_file

TESTS = Path(__file__).parent
CORPUS_DIR = TESTS / "fuzz_corpus"
CORPUS = sorted(CORPUS_DIR.glob("*.tokpol"))
SEED_FILES = sorted([
    TESTS / "data" / "everything.tokpol",
    *(TESTS / "golden" / "parse").glob("*.tokpol"),
    *(TESTS.parent / "policies").glob("**/*.tokpol"),
])
SEED_TEXTS = [p.read_text(encoding="utf-8") for p in SEED_FILES]
FILE_NAME = "fuzz.tokpol"

FUZZ_SETTINGS = settings(
    max_examples=example_count(),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

_LOCATION = re.compile(r"^(?P<file>[^\n:]+\.tokpol):(?P<line>\d+):(?P<col>\d+): error: ", re.MULTILINE)


def check_text(text: str, name: str = FILE_NAME) -> None:
    """`text` parses and round-trips through the printer, or fails with a located, caret-marked `PolicyError`."""
    try:
        parsed = parse(text, name)
    except PolicyError as error:
        check_located(error, text, name)
        return
    printed = print_file(parsed)
    assert parse(printed, name) == parsed, printed
    assert print_file(parse(printed, name)) == printed


def check_located(error: PolicyError, text: str, name: str) -> None:
    """Every diagnostic of `error` names `name:line:col`, inside `text`, and shows the line with a caret under it."""
    rendered = str(error)
    assert error.diagnostics, "a PolicyError without diagnostics"
    source_lines = text.split("\n")
    for block in rendered.split("\n\n"):
        match = _LOCATION.match(block)
        assert match is not None, f"diagnostic without a file:line:col location:\n{rendered}"
        assert match["file"] == name, rendered
        line, column = int(match["line"]), int(match["col"])
        assert 1 <= line <= len(source_lines), f"line {line} is outside the text:\n{rendered}"
        assert 1 <= column <= len(source_lines[line - 1]) + 1, f"column {column} is outside line {line}:\n{rendered}"
        shown = block.split("\n")
        assert len(shown) >= 3, f"no source and caret lines:\n{rendered}"
        assert shown[1] == "    " + source_lines[line - 1].expandtabs(1), rendered
        assert re.fullmatch(r" {4}" + " " * (column - 1) + r"\^+", shown[2]), f"caret not under column:\n{rendered}"


# ---------------------------------------------------------------- (a) random text

_PUNCTUATION = ["{", "}", "(", ")", "[", "]", ",", "=", ".", "..", "->", "*", "/", "+", "-", "|", "&", "<", "<=",
                ">", ">=", "==", "!=", "%", '"', "\\", "#", ":", ";", "'", "\n", " ", "\t", "\r"]
_WORDS = [*sorted(KEYWORDS), "vision", "text", "llm", "layer", "attention", "k", "x", "_", "decode"]
_ATOMS = ["0", "1", "22", "0.5", "1e-05", "2E+3", "8%", "0.25%", '"s"', '"a\\"b"', '"\\n"', '"\\q"', "#c\n",
          "1" + "0" * 400, "1e999"]

_biased_chars = st.one_of(
    st.sampled_from(list("{}()[],=.*/+-|&<>!%\"\\#:;' \n\t")),
    st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_ABC0123456789")),
    st.characters(codec="utf-8"),
)
_random_chars = st.text(_biased_chars, max_size=80)
_random_tokens = st.lists(
    st.one_of(st.sampled_from(_PUNCTUATION), st.sampled_from(_WORDS), st.sampled_from(_ATOMS),
              st.text(_biased_chars, max_size=3)),
    max_size=40,
).map(" ".join)
_random_glued = st.lists(st.one_of(st.sampled_from(_PUNCTUATION), st.sampled_from(_WORDS),
                                   st.sampled_from(_ATOMS)), max_size=40).map("".join)


@FUZZ_SETTINGS
@given(st.one_of(_random_chars, _random_tokens, _random_glued))
@example("")
@example("policy")
@example("policy p {")
@example('"')
@example("\n\n\n")
def test_random_text_raises_only_policy_errors(text: str) -> None:
    """Random text parses (and round-trips) or raises a located `PolicyError`; nothing else escapes."""
    check_text(text)


# ---------------------------------------------------------------- (b) mutations of valid text

_TOKEN = re.compile(
    r'"(?:[^"\\\n]|\\.)*"|#[^\n]*|\d+(?:\.\d+)?%|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_]\w*|\.\.|->|[<>=!]=|\s+|.',
    re.DOTALL,
)
_INSERTS = st.one_of(st.sampled_from(_PUNCTUATION), st.sampled_from(_WORDS), st.sampled_from(_ATOMS),
                     st.characters(codec="utf-8"))


def _apply(pieces: list[str], op: str, i: int, j: int, insert: str) -> list[str]:
    """One mutation of a list of pieces (characters or tokens) at positions `i`, `j` (taken modulo the length)."""
    if not pieces:
        return [insert] if op == "insert" else pieces
    n = len(pieces)
    i, j = i % n, j % (n + 1)
    if op == "delete":
        return pieces[:i] + pieces[i + 1 :]
    if op == "insert":
        return [*pieces[:j], insert, *pieces[j:]]
    if op == "duplicate":
        return [*pieces[: i + 1], pieces[i], *pieces[i + 1 :]]
    if op == "replace":
        return [*pieces[:i], insert, *pieces[i + 1 :]]
    if op == "swap":
        k = j % n
        swapped = list(pieces)
        swapped[i], swapped[k] = swapped[k], swapped[i]
        return swapped
    if op == "delete_range":
        return pieces[: min(i, j)] + pieces[max(i, j) :]
    return pieces[:j]  # truncate


_NUMBER_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?%?")
# Number texts for the `renumber` mutation: ordinary, exponent-heavy, and far too long for int() or float.
_NUMBER_TEXTS = st.one_of(
    st.from_regex(r"[0-9]{1,20}(\.[0-9]{1,20})?([eE][+-]?[0-9]{1,4})?%?", fullmatch=True),
    st.tuples(st.integers(min_value=300, max_value=6000), st.sampled_from(["", "%", ".5", ".5%"])).map(
        lambda n_suffix: "9" * n_suffix[0] + n_suffix[1]
    ),
)
# Ways to nest a name deeply: prefix operators, lists, calls, indexing, parentheses (which add no tree level).
_NESTINGS = [("not ", ""), ("- ", ""), ("[", "]"), ("f(", ")"), ("(", ")"), ("", "[0]")]
_OPS = ["delete", "insert", "replace", "duplicate", "swap", "delete_range", "truncate", "renumber", "nest"]


@st.composite
def mutated_texts(draw: st.DrawFn) -> str:
    """Valid policy text with a few random edits at character or token level."""
    text = draw(st.sampled_from(SEED_TEXTS)) if draw(st.booleans()) else print_file(draw(policy_files))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(_OPS))
        i = draw(st.integers(min_value=0, max_value=10**6))
        j = draw(st.integers(min_value=0, max_value=10**6))
        if op == "renumber":  # a number token becomes another (possibly enormous) number
            pieces = _TOKEN.findall(text)
            spots = [k for k, piece in enumerate(pieces) if _NUMBER_TOKEN.fullmatch(piece)]
            if spots:
                pieces[spots[i % len(spots)]] = draw(_NUMBER_TEXTS)
            text = "".join(pieces)
            continue
        if op == "nest":  # a name becomes `not not ... name`, `[[[name]]]`, `f(f(name))`, `name[0][0]`, ...
            pieces = _TOKEN.findall(text)
            spots = [k for k, piece in enumerate(pieces) if piece.isidentifier() and piece not in KEYWORDS]
            if spots:
                before, after = draw(st.sampled_from(_NESTINGS))
                depth = draw(st.integers(min_value=1, max_value=600))
                spot = spots[i % len(spots)]
                pieces[spot] = before * depth + pieces[spot] + after * depth
            text = "".join(pieces)
            continue
        pieces = _TOKEN.findall(text) if draw(st.booleans()) else list(text)
        # Mostly one piece; sometimes a long run of it (`not not ...`, `( ( (`, `- - -`) to find nesting limits.
        count = draw(st.one_of(st.just(1), st.integers(min_value=2, max_value=600)))
        insert = " ".join([draw(_INSERTS)] * count)
        text = "".join(_apply(pieces, op, i, j, insert))
    return text


@FUZZ_SETTINGS
@given(mutated_texts())
def test_mutated_text_raises_only_policy_errors(text: str) -> None:
    """Edited valid text parses (and round-trips) or raises a located `PolicyError`; nothing else escapes."""
    check_text(text)


@pytest.mark.parametrize("seed", SEED_FILES, ids=lambda p: str(p.relative_to(TESTS.parent)))
def test_every_truncation_of_a_seed(seed: Path) -> None:
    """Each prefix of each seed file (a cheap exhaustive sweep) obeys the same property."""
    text = seed.read_text(encoding="utf-8")
    for end in range(0, len(text) + 1, 7):
        check_text(text[:end])


# ---------------------------------------------------------------- regression corpus


def test_corpus_is_not_empty() -> None:
    """Guard against a glob that silently matches nothing."""
    assert len(CORPUS) >= 5


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_corpus_entry(path: Path) -> None:
    """A once-failing input now parses and round-trips, or raises a located `PolicyError`."""
    check_text(path.read_bytes().decode("utf-8"), path.name)
