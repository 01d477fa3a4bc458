"""Replacing an attribute of one object (a model's generate(), a decoder's forward()) and undoing it."""

from __future__ import annotations

from collections.abc import Callable


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
