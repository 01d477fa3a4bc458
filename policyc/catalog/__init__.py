"""Every name a policy can use, by kind. `policyc list` prints these registries."""

from policyc.catalog.base import Option, Registry, Spec
from policyc.catalog.caches import CACHES
from policyc.catalog.functions import FUNCTIONS
from policyc.catalog.hooks import HOOKS, POSITIONS, HookSpec
from policyc.catalog.merges import MERGES
from policyc.catalog.schedules import SCHEDULES
from policyc.catalog.selectors import SELECTORS
from policyc.catalog.sets import SETS
from policyc.catalog.signals import SIGNALS
from policyc.catalog.statements import STATEMENTS

REGISTRIES: tuple[Registry, ...] = (
    HOOKS, STATEMENTS, SETS, SIGNALS, FUNCTIONS, SCHEDULES, SELECTORS, MERGES, CACHES, POSITIONS,
)

__all__ = ["CACHES", "FUNCTIONS", "HOOKS", "MERGES", "POSITIONS", "REGISTRIES", "SCHEDULES", "SELECTORS", "SETS",
           "SIGNALS", "STATEMENTS", "HookSpec", "Option", "Registry", "Spec"]
