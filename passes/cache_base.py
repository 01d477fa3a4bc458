"""The base class of decode-time cache operators (`cache METHOD(options)` in `stage decode`).

A subclass writes one method, `keep`: given a layer's cache slots, which stay. The shared machinery
(policyc/runtime/cache.py) calls it after prefill, and after every decode step for operators with
`every_step`; it keeps protected tokens whatever `keep` says, gathers keys, values and the slot map,
and rebuilds each layer's mask from the slot map. Budgets count real tokens only: padding and empty
slots never take a slot a real token needs.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from policyc.passes.base import registrar

from policyc.catalog.base import Spec
from policyc.catalog.caches import CACHES
from policyc.errors import PolicyError
from policyc.kernels import KERNELS
from policyc.lang import ir


@dataclass
class Slots:
    """One layer's cache as a cache operator sees it: n slots per key/value head."""

    positions: torch.Tensor  # [B, Hkv, n] long: the token each slot holds (its index in the sequence), -1: empty
    real: torch.Tensor  # [B, Hkv, n] bool: the slot holds a real token (not padding, not empty)
    protected: torch.Tensor  # [B, Hkv, n] bool: a `protect`ed prompt token (always kept)
    survives: torch.Tensor  # [B, Hkv, n] bool: the token survives the last prefill stage (generated ones do)
    scores: torch.Tensor | None  # [B, Hkv, n] float: accumulated attention or window votes, per key/value head
    prompt_size: torch.Tensor  # [B] long: real prompt tokens this layer cached in prefill (percent budgets)
    after_prefill: bool  # True for the call right after prefill, False after a decode step
    # generated tokens the sequence holds (the cache's tokens past the prompt, evicted or not); a 0-dim long tensor
    # under static caches, where a Python count would recompile every compiled decode step
    generated: int | torch.Tensor = 0
    # [B, H, n] float: the newest decode query's attention logits (q . k * scale) per query head over the slots,
    # -inf where its mask blocks a slot (operators with `scores = "newest"`; None right after prefill)
    newest: torch.Tensor | None = None

    @property
    def candidates(self) -> torch.Tensor:
        """[B, Hkv, n] bool: real, unprotected slots: the ones a budget is spent on."""
        return self.real & ~self.protected

    def reordered(self, order: torch.Tensor) -> Slots:
        """These slots permuted by `order` ([B, Hkv, n] long, slot indices) in every per-slot field; `newest` (per
        query head) follows its key/value head's order."""
        def take(field: torch.Tensor | None) -> torch.Tensor | None:
            if field is None:
                return None
            index = order.repeat_interleave(field.shape[1] // order.shape[1], dim=1)
            return torch.gather(field, -1, index)

        return dataclasses.replace(self, positions=take(self.positions), real=take(self.real),
                                   protected=take(self.protected), survives=take(self.survives),
                                   scores=take(self.scores), newest=take(self.newest))


class CacheOp(ABC):
    """A decode-time KV-cache policy. Options are literals (parameters resolved, defaults filled)."""

    name: ClassVar[str]  # the catalog name: `spec.name`
    spec: ClassVar[Spec]  # the language signature: name, options, stages, paper, one-line summary
    # what `Slots.scores` holds; "newest": none, but `Slots.newest` holds the newest decode query's logits;
    # "normalized": right after prefill, ZipVL's normalized score (the prompt's column sums divided by the real
    # prompt rows that see each key), then `Slots.newest` as "newest"; "coactivation": right after prefill, MLP
    # co-activation with a reference token (policyc/runtime/cache_coactivation.py)
    scores: ClassVar[Literal["none", "accumulated", "window", "newest", "normalized", "coactivation"]] = "none"
    every_step: ClassVar[bool] = False  # also called after each decode step (not only after prefill)
    all_layers: ClassVar[bool] = True  # every decoder layer; False: the layers from the first prefill stage on
    relative_positions: ClassVar[bool] = False  # after an eviction, keys are re-rotated to their cache index

    def __init__(self, statement: ir.Cache, values: Mapping[str, ir.Expr]) -> None:
        from policyc.lang.build import parse_value

        self.statement = statement
        given = {k.name: values.get(k.value.id, k.value) if isinstance(k.value, ir.Name) else k.value
                 for k in statement.options}
        spec = CACHES.get(statement.method, statement.span)
        self.options: dict[str, ir.Expr] = {o.name: given[o.name] if o.name in given else parse_value(str(o.default))
                                            for o in spec.options}
        self.validate()

    def validate(self) -> None:  # noqa: B027  (optional: most operators accept every value the checker does)
        """Reject option values the operator cannot run with (a `PolicyError` at the statement)."""

    def error(self, message: str, hint: str | None = None) -> PolicyError:
        return PolicyError.at(message, self.statement.span, hint)

    def number(self, name: str) -> float:
        value = self.options[name]
        if not isinstance(value, ir.Number):
            raise self.error(f"cache option {name} must be a number here")
        return value.value

    def word(self, name: str) -> str:
        value = self.options[name]
        return value.id if isinstance(value, ir.Name) else str(getattr(value, "value", value))

    def budget(self, name: str, slots: Slots) -> torch.Tensor:
        """[B] long: a count option, or a percentage of the real prompt tokens the layer cached (truncated)."""
        value = self.options[name]
        if isinstance(value, ir.Percent):
            return (slots.prompt_size.double() * value.value / 100).floor().long()
        return torch.full_like(slots.prompt_size, int(self.number(name)))

    @abstractmethod
    def keep(self, slots: Slots) -> torch.Tensor:
        """[B, Hkv, n] bool: which slots stay (protected slots stay whatever this says)."""

    def most_held(self, slots: Slots) -> torch.Tensor | None:
        """Given a layer's slots right after prefill (evicted), [B, Hkv] the most tokens it can hold after any later
        decode step's eviction; None (the default): no bound, the cache may grow by a token per step. Static caches
        size their slot layers by it (one more slot, for the incoming token)."""
        return None


class QuantizingCacheOp(CacheOp):
    """A cache policy that keeps every token and stores some in fewer bits (policyc/runtime/cache_quantized.py).
    A subclass writes one method, `widths`; the machinery quantizes the full-precision slots it names."""

    widths_supported: ClassVar[tuple[int, ...]] = (2, 4, 8)  # what the packer stores (8 / b codes per byte)

    def keep(self, slots: Slots) -> torch.Tensor:
        return torch.ones_like(slots.real)

    def bits(self, name: str) -> int:
        """A bit-width option, refused unless the packer supports it (the closest supported width as hint)."""
        value = int(self.number(name))
        if value not in self.widths_supported:
            closest = min(self.widths_supported, key=lambda b: (abs(b - value), b))
            widths = ", ".join(f"{b}-" for b in self.widths_supported[:-1]) + f" or {self.widths_supported[-1]}-bit"
            raise self.error(f"cache {self.name} cannot store {name}={value}: policyc packs {widths} codes",
                             f"did you mean {name}={closest}?")
        return value

    @abstractmethod
    def widths(self, slots: Slots) -> torch.Tensor:
        """[B, Hkv, n] long: the bit width each full-precision slot is quantized to now (0: it stays in full
        precision; slots already quantized are left as they are whatever this says)."""


CACHE_OPS: dict[str, type[CacheOp]] = {}  # classes: the cache runtime makes one per compiled model
register_cache = registrar(CACHE_OPS, "cache operator", instantiate=False, catalog=CACHES, kinds=("cache",))


def last(candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] bool: the last `count[b]` candidates of each row, in slot order."""
    from_end = candidates.flip(-1).long().cumsum(-1).flip(-1)  # candidates at or after each slot
    return candidates & (from_end <= count[:, None, None])


def first(candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] bool: the first `count[b]` candidates of each row, in slot order."""
    return candidates & (candidates.long().cumsum(-1) <= count[:, None, None])


def top(candidates: torch.Tensor, scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, n] bool: the `count[b]` highest-scoring candidates of each row; ties go to the earlier slot."""
    return KERNELS["top_ranked"](scores, candidates, count[:, None].expand(candidates.shape[:2]))
