"""Selectors: `SELECTOR amount of SET [by ...]` picks a token set. Kept indices stay in original order.

Each selector (`passes/select_top.py`, ...) declares its spec beside its code and registers it here."""

from policyc.catalog.base import Option, Registry

# `top(allocate=S) 64 of vision by S`: one budget per sample, split across its images (passes/allocate.py).
ALLOCATE = Option("allocate", ("score", "enum"), "`none`: the amount holds for each image on its own; a score or "
                  "`equal`: the amount is one budget for each sample's images, split across them in proportion to "
                  "the sum of the score over each image's candidates (GlobalCom2, HiRED), or equally",
                  default="none", choices=("none", "equal"))

SELECTORS = Registry("selector", "selector", operators=True)
