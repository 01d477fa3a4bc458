"""policyc's hot tensor ops, one per file, each eager or fused by torch.compile (`base.py`)."""

from policyc.kernels import attention_columns, attention_rows  # noqa: F401  (registers the kernels)
from policyc.kernels.attention_columns import column_sums
from policyc.kernels.base import KERNELS, Kernel, fused_on, fusion, register_kernel, set_fusion

__all__ = ["KERNELS", "Kernel", "column_sums", "fused_on", "fusion", "register_kernel", "set_fusion"]
