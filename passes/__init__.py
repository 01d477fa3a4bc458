"""Runtime operators, one per file, registered by the names the language's catalog uses.

Shipped as `policyc.passes`. Importing this package registers every operator in it: each module is
imported in name order, so a new operator is one new file here (nothing to list).
"""

import importlib
import pkgutil

from policyc.passes.base import SIGNAL_OPS, SignalOp, register_signal
from policyc.passes.cache_base import CACHE_OPS, CacheOp, register_cache
from policyc.passes.features import FEATURE_OPS, FeatureOp, register_feature
from policyc.passes.functions import (
    FUNCTION_OPS,
    AmountFunction,
    FunctionOp,
    ScoreFunction,
    SetFunction,
    register_function,
)
from policyc.passes.graph import GRAPH_PASSES, GraphPass, register_graph_pass
from policyc.passes.merges import MERGE_OPS, MergeOp, register_merge
from policyc.passes.schedules import SCHEDULE_OPS, LayerSchedule, ScheduleOp, register_schedule
from policyc.passes.selectors import SELECTOR_OPS, SelectorOp, register_selector

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["CACHE_OPS", "FEATURE_OPS", "FUNCTION_OPS", "GRAPH_PASSES", "MERGE_OPS", "SCHEDULE_OPS", "SELECTOR_OPS",
           "SIGNAL_OPS", "AmountFunction", "CacheOp", "FeatureOp", "FunctionOp", "GraphPass", "LayerSchedule",
           "MergeOp", "ScheduleOp", "ScoreFunction", "SelectorOp", "SetFunction", "SignalOp", "register_cache",
           "register_feature", "register_function", "register_graph_pass", "register_merge", "register_schedule",
           "register_selector", "register_signal"]
