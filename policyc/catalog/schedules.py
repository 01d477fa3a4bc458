"""Schedules: amounts that vary by layer across a multi-layer stage, or adapt to the scores.

A list literal `[300, 200, 110]` is the explicit schedule: one kept count per layer. Each schedule
(`passes/schedule_geometric.py`, ...) declares its spec beside its code and registers it here; plug-ins add theirs
the same way (policyc.operators)."""

from policyc.catalog.base import Registry

SCHEDULES = Registry("schedule", "schedule", operators=True)
