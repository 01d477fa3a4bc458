"""The base class of policyc's hot tensor ops (kernels): subclasses write one method, `compute`, in plain PyTorch.

A kernel runs `compute` eagerly, or fused by `torch.compile` (inductor: Triton on CUDA, C++ on CPU) with dynamic
shapes, so that prompts of other lengths and stages keeping other counts reuse the compiled code instead of
recompiling. Fusion is on by default on CUDA devices and off elsewhere (`set_fusion`, or the environment variable
`POLICYC_FUSED=1|0`). If compiling fails where it is on (no Triton, an unsupported op), the kernel warns once and
runs eagerly from then on: the same function, slower.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

Fusion = Literal["auto", "on", "off"]
_FUSION: list[Fusion] = ["auto"]


def set_fusion(mode: Fusion) -> None:
    """`auto`: fuse on CUDA devices only; `on`: fuse everywhere (CPU too: inductor's C++ backend); `off`: eager."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"fusion is 'auto', 'on' or 'off', not {mode!r}")
    _FUSION[0] = mode


def fusion() -> Fusion:
    """The fusion mode in force: `set_fusion`'s, else POLICYC_FUSED (1: on, 0: off), else auto."""
    env = os.environ.get("POLICYC_FUSED")
    if _FUSION[0] == "auto" and env in ("0", "1"):
        return "on" if env == "1" else "off"
    return _FUSION[0]


def fused_on(device: torch.device) -> bool:
    """Whether kernels on `device` run fused (torch.compile) rather than eagerly."""
    mode = fusion()
    return mode == "on" or (mode == "auto" and device.type == "cuda")


class Kernel(ABC):
    """One hot op. `compute` takes and returns tensors (plus Python scalars); calling the kernel picks eager or
    fused per the fusion mode and the device of its first tensor argument."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._compiled: Callable[..., Any] | None = None
        self._broken = False  # compiling failed once: eager from then on

    @abstractmethod
    def compute(self, *args: Any) -> Any:
        """The op in plain PyTorch (the semantics; also what torch.compile fuses)."""

    def __call__(self, *args: Any) -> Any:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        if self._broken or not fused_on(device) or torch.compiler.is_compiling():
            return self.compute(*args)
        if self._compiled is None:
            self._compiled = torch.compile(self.compute, dynamic=True, fullgraph=True)
        try:
            return self._compiled(*args)
        except (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError) as error:
            # the compiler failed (an op it cannot trace, no Triton): the same function, eager; errors of the
            # computation itself are no compiler failures and propagate
            self._broken = True
            warnings.warn(f"policyc kernel {self.name!r} could not be compiled ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); it runs eagerly", stacklevel=2)
            return self.compute(*args)


KERNELS: dict[str, Kernel] = {}


def register_kernel(cls: type[Kernel]) -> type[Kernel]:
    """Make one instance of `cls` available as KERNELS[cls.name]."""
    if cls.name in KERNELS:
        raise ValueError(f"kernel {cls.name!r} is registered twice")
    KERNELS[cls.name] = cls()
    return cls


__all__ = ["KERNELS", "Fusion", "Kernel", "fused_on", "fusion", "register_kernel", "set_fusion"]
