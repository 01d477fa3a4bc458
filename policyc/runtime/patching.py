"""Replacing an attribute of one object (a model's generate(), a decoder's forward()) and undoing it."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def replace_attribute(owner: object, name: str, value: object) -> Callable[[], None]:
    """Set `owner.name = value` on the instance; the returned undo restores the instance attribute that was
    there before, or deletes it so the class's attribute shows again."""
    previous = owner.__dict__.get(name)
    setattr(owner, name, value)

    def undo() -> None:
        if previous is None:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)

    return undo


class LayerWrapper(nn.Module):
    """A module standing in for one of the model's layers (`inner`, its index in its stack): what the wrapper does
    not define reads through to the layer (e.g. `attention_type`, read by some models' layer loops)."""

    def __init__(self, inner: nn.Module, index: int) -> None:
        super().__init__()
        self.inner = inner
        self.index = index

    def __getattr__(self, name: str) -> object:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

