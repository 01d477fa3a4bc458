"""Signals: per-token scores and features read from the model at a stage.

Each signal (`passes/attention.py`, ...) and feature (`passes/keys.py`, ...) declares its spec beside its code and
registers it here; plug-ins add theirs the same way (policyc.operators)."""

from policyc.catalog.base import Option, Registry

LAYER = Option("layer", ("number", "enum"), "layer to read: an index (negative from the end), `next` "
               "(recompute with the next layer's projections, as PyramidDrop) or `previous` (the LLM layer before "
               "the stage's, as recorded: CATP's attention gain); default: this stage's layer",
               default="here", choices=("next", "previous"), integer=True)

SIGNALS = Registry("signal", "signal", operators=True)
