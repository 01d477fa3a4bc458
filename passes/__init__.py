"""Runtime operators, one per file, registered by the names the language's catalog uses.

Shipped as `policyc.passes`. Importing this package registers every operator in it.
"""

from policyc.passes import (  # noqa: F401  (registration)
    attention,
    graph_stage_drop,
    key_norm,
    random_score,
)
from policyc.passes.base import SIGNAL_OPS, SignalOp, register_signal
from policyc.passes.graph import GRAPH_PASSES, GraphPass, register_graph_pass

__all__ = ["GRAPH_PASSES", "SIGNAL_OPS", "GraphPass", "SignalOp", "register_graph_pass", "register_signal"]
