"""The base class of feature operators (`keys`, `hidden`): per-token vectors that selectors and merges
compare (`diverse ... by keys`, `merge ... by hidden`). Subclasses write one method, `compute`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch
from policyc.passes.base import registrar

from policyc.catalog.base import Spec
from policyc.catalog.signals import SIGNALS
from policyc.lang import ir

if TYPE_CHECKING:
    from policyc.runtime.evaluate import StageEvaluator


class FeatureOp(ABC):
    """Per-token features read from the model at a stage."""

    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, stages, paper, one-line summary
    reads_values: ClassVar[bool] = False  # encoder stages record the layer's attention values (ctx.recorded_values)

    @abstractmethod
    def compute(self, call: ir.Call, ctx: StageEvaluator) -> torch.Tensor:
        """Features of the current rows, [B, L', C] (row j is the token at original position state.kept[:, j])."""


FEATURE_OPS: dict[str, FeatureOp] = {}
register_feature = registrar(FEATURE_OPS, "feature operator", catalog=SIGNALS, kinds=("feature",))
