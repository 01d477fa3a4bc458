"""policyc's hot tensor ops, one per file, each eager or fused by torch.compile (`base.py`)."""

from policyc.kernels import (  # noqa: F401  (registers the kernels)
    attention_columns,
    attention_rows,
    bipartite_match,
    kept_rows,
    top_ranked,
)
from policyc.kernels.attention_columns import column_sums
from policyc.kernels.base import KERNELS, Kernel, fused_on, fusion, register_kernel, set_fusion

__all__ = ["KERNELS", "Kernel", "column_sums", "fused_on", "fusion", "register_kernel", "set_fusion"]
