"""Statements: what a stage does. The grammar spells each one with a keyword of the same name."""

from policyc.catalog.base import Registry, Spec

STATEMENTS = Registry("statement", "statement")
STATEMENTS.add(
    Spec("let", "statement", "`let NAME = SET` names a token set, visible in this and every later stage",
         returns="set"),
    Spec("score", "statement", "`score NAME = SCORE` names a per-token score"),
    Spec("keep", "statement", "`keep SET` keeps these image tokens (and protected ones) and drops the others",
         returns="set"),
    Spec("drop", "statement", "`drop SET` drops these tokens, except protected ones", returns="set"),
    Spec("protect", "statement", "`protect SET`: these tokens survive this and every later stage", returns="set"),
    Spec("merge", "statement", "`merge METHOD(options) of SET [into SET] [by FEATURES]` folds tokens into others",
         returns="set"),
    Spec("positions", "statement", "`positions MODE` sets the position ids of kept tokens (default: original)",
         stages=frozenset({"llm"})),
    Spec("cache", "statement", "`cache METHOD(options)` chooses the decode-time KV-cache policy",
         stages=frozenset({"decode"})),
)
