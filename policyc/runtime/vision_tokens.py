"""The image tokens of one vision forward as rows of the current sequence, and what stages do to them:
run a stage's statements (merges folded in), compact to the rows still alive, scatter rows back to their
representatives' slots. Used by policyc/runtime/vision.py."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from policyc.compiler.plan import BoundStage, Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.passes import MERGE_OPS
from policyc.passes.base import selected_first
from policyc.passes.merges import Folding, MergeRows
from policyc.runtime.evaluate import PrefillState, StageEvaluator


@dataclass(frozen=True)
class Tokens:
    """Image tokens as the rows of the current sequence, one image per batch row."""

    hidden: torch.Tensor  # [I, R, C]
    origin: torch.Tensor  # [I, R] long: the token's own position (its identity)
    first: torch.Tensor  # [I, R] long: earliest position folded into the row (its representative)
    size: torch.Tensor  # [I, R] float: original tokens folded into the row
    owner: torch.Tensor | None = None  # [I, P] long: per ORIGINAL position, the origin of the row holding it
    # [I, R, K] features that ride along with each row: merges combine them exactly as they combine `hidden` (same
    # groups, weights and rule), compaction and scattering move them alike; no stage reads them (Qwen3-VL's
    # DeepStack levels at projector.output, channel-concatenated)
    riders: torch.Tensor | None = None
    # [I, P, P] float: per ORIGINAL position p, the weights of the rows (by origin) that rebuild it at the encoder
    # output (Expedit's token reconstruction: soft merges with `reconstruct=on`); None: rows reach the projector
    spread: torch.Tensor | None = None

    @classmethod
    def start(cls, hidden: torch.Tensor, riders: torch.Tensor | None = None) -> Tokens:
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
        return cls(hidden, positions, positions, torch.ones(positions.shape, device=hidden.device), positions,
                   riders)

    def rows(self, index: torch.Tensor) -> Tokens:
        """The rows `index` [I, R'] of each image."""
        def gather(values: torch.Tensor) -> torch.Tensor:
            return values.gather(1, index[:, :, None].expand(-1, -1, values.shape[-1]))

        return Tokens(gather(self.hidden), self.origin.gather(1, index), self.first.gather(1, index),
                      self.size.gather(1, index), self.owner, None if self.riders is None else gather(self.riders),
                      self.spread)

    def reconstructed(self, alive_rows: torch.Tensor) -> Tokens:
        """Every original position rebuilt from the alive rows by `spread` (Expedit's y_i = sum_j W_ij z_j), as
        fresh tokens [I, P, C] in position order."""
        if self.spread is None:
            return self
        present = torch.zeros(self.spread.shape[:2], dtype=torch.bool, device=alive_rows.device).scatter(
            1, self.origin, alive_rows)  # [I, P] origins of the alive rows
        if bool(((self.spread != 0) & ~present[:, None, :]).any()):
            raise PolicyError.at("reconstruct=on rebuilds the patches from every cluster token, but a later stage "
                                 "dropped or merged some", None, "drop or merge after the encoder output")
        weights = self.spread.gather(2, self.origin[:, None, :].expand(-1, self.spread.shape[1], -1))  # [I, P, R]
        return Tokens.start(weights.masked_fill(~alive_rows[:, None, :], 0.0).to(self.hidden.dtype) @ self.hidden)

    @property
    def values(self) -> torch.Tensor:
        """[I, R, C (+ K)]: `hidden`, with the riders' channels after its own."""
        return self.hidden if self.riders is None else torch.cat([self.hidden, self.riders], dim=-1)

    def unmerged(self, hidden: torch.Tensor) -> torch.Tensor:
        """`hidden` [I, R, C] over these rows, at every original position: each position takes the row its token
        was merged into (ToMe for Stable Diffusion's unmerge): [I, P, C]."""
        if self.owner is None:
            raise ValueError("these tokens do not track which row holds each position")
        if self.spread is not None:
            raise PolicyError.at("reconstruct=on (Expedit's token reconstruction) runs where the tower's rows reach "
                                 "the projector (LLaVA); this family's connector reads every patch", None,
                                 "leave reconstruct off: merged tokens are unmerged to their patches here")
        rows = torch.arange(self.origin.shape[1], device=self.origin.device).expand_as(self.origin)
        row_of = torch.zeros_like(self.owner).scatter(1, self.origin, rows).gather(1, self.owner)
        return hidden.gather(1, row_of[:, :, None].expand(-1, -1, hidden.shape[-1]))



def fold(tokens: Tokens, folding: Folding) -> tuple[Tokens, torch.Tensor]:
    """Combine each group of rows into its receiving row; returns the new tokens and the rows folded away. The
    riders are combined in the same pass, as channels of their own (every rule acts channel by channel)."""
    into, hidden, size = folding.into, tokens.values, tokens.size
    own = torch.arange(into.shape[1], device=into.device).expand_as(into)
    moved = into != own
    wide = into[:, :, None].expand_as(hidden)
    joined = moved if folding.fused is None else folding.fused  # rows that join a group
    received = torch.zeros_like(into).scatter_add(1, into, joined.long()) > 0
    total = torch.zeros_like(size).scatter_add(1, into, size)
    if folding.combine == "wavg":
        merged = torch.zeros_like(hidden).scatter_add(1, wide, hidden * size[:, :, None].to(hidden.dtype))
        merged = merged / total.clamp(min=1e-12)[:, :, None].to(hidden.dtype)
    elif folding.combine == "mean":
        count = torch.zeros_like(size).scatter_add(1, into, torch.ones_like(size))
        merged = torch.zeros_like(hidden).scatter_add(1, wide, hidden) / count.clamp(min=1)[:, :, None].to(hidden.dtype)
    elif folding.combine == "weighted_sum":  # EViT's fused token: sum of weight * row over the group
        if folding.weights is None:
            raise ValueError("a weighted_sum folding needs weights")
        weights = torch.where(joined, folding.weights, torch.zeros_like(folding.weights))
        merged = torch.zeros_like(hidden).scatter_add(1, wide, hidden * weights[:, :, None].to(hidden.dtype))
    elif folding.combine == "soft":  # Expedit's clusters: affinity-weighted means of the rows
        if folding.affinity is None:
            raise ValueError("a soft folding needs affinities")
        mass = folding.affinity.sum(2)
        received = mass > 0
        merged = (folding.affinity.to(hidden.dtype) @ hidden) / mass.clamp(min=1e-16)[:, :, None].to(hidden.dtype)
    elif folding.combine == "add":  # GTP-ViT's propagation: each row plus the affinity-weighted sum, sizes alike
        if folding.affinity is None:
            raise ValueError("an add folding needs affinities")
        received = folding.affinity.sum(2) > 0
        merged = hidden + folding.affinity.to(hidden.dtype) @ hidden
        total = size + (folding.affinity.to(size.dtype) @ size[:, :, None])[:, :, 0]
    else:  # add_mean: the receiver plus the mean of what folded into it (VisionZip)
        count = torch.zeros_like(size).scatter_add(1, into, moved.to(size.dtype))
        incoming = torch.zeros_like(hidden).scatter_add(1, wide, hidden * moved[:, :, None].to(hidden.dtype))
        merged = hidden + incoming / count.clamp(min=1)[:, :, None].to(hidden.dtype)
    hidden = torch.where(received[:, :, None], merged, hidden)
    first = tokens.first if folding.combine == "add" else \
        tokens.first.scatter_reduce(1, into, tokens.first, reduce="amin")  # add: rows spread out, receivers stay put
    owner, spread = tokens.owner, tokens.spread
    if folding.spread is not None:  # by position: p takes W[row of p, j] at row j's origin, or keeps itself
        batch, positions = into.shape[0], owner.shape[1] if owner is not None else int(tokens.origin.max()) + 1
        image = torch.arange(batch, device=into.device)[:, None, None]
        by_position = torch.zeros(batch, positions, positions, device=into.device)
        by_position[image, tokens.origin[:, :, None], tokens.origin[:, None, :]] = folding.spread.float()
        covered = torch.zeros(batch, positions, dtype=torch.bool, device=into.device).scatter(
            1, tokens.origin, folding.spread.sum(2) > 0)
        rebuilt = torch.where(covered[:, :, None], by_position, torch.eye(positions, device=into.device))
        spread = rebuilt if spread is None else spread @ rebuilt
    if owner is not None:  # positions held by a row that folded now belong to its receiver (one level: receivers stay)
        receiver = torch.arange(owner.shape[1], device=owner.device).expand_as(owner)
        owner = receiver.scatter(1, tokens.origin, tokens.origin.gather(1, into)).gather(1, owner)
    width = tokens.hidden.shape[-1]
    riders = None if tokens.riders is None else hidden[..., width:]
    return Tokens(hidden[..., :width], tokens.origin, first, torch.where(received, total, size), owner,
                  riders, spread), moved


def run_statements(stage: BoundStage, evaluator: StageEvaluator, tokens: Tokens,
                   ) -> tuple[Tokens, torch.Tensor, torch.Tensor | None, bool]:
    """Run one stage's statements. Returns the tokens (merges applied), the alive positions [I, P], the
    row order a merge asked for, and whether a merge turned on proportional attention."""
    state = evaluator.state
    alive = state.alive() & state.valid
    order, proportional = None, False
    for statement in stage.statements:
        if (applied := evaluator.apply(statement, alive)) is not None:
            alive = applied
            continue
        match statement:
            case ir.Merge() as merge:
                tokens, moved, merge_order, merge_proportional = _merge(merge, evaluator, tokens, alive)
                gone = torch.zeros_like(alive).scatter(1, tokens.origin, moved)
                alive, state.valid = alive & ~gone, state.valid & ~gone
                evaluator.hidden = tokens.hidden
                order = merge_order if merge_order is not None else order
                proportional = proportional or merge_proportional
            case _:
                raise PolicyError.at("this statement is not supported before the LLM", statement.span)
    return tokens, alive, order, proportional


def _merge(merge: ir.Merge, evaluator: StageEvaluator, tokens: Tokens, alive: torch.Tensor,
           ) -> tuple[Tokens, torch.Tensor, torch.Tensor | None, bool]:
    op = MERGE_OPS[merge.method]
    state = evaluator.state
    members = evaluator.set(merge.source) & alive
    receivers = evaluator.set(merge.into) & alive if merge.into is not None else members
    features = evaluator.features(merge.by) if merge.by is not None and op.spec.by == "feature" else None
    weights = evaluator.score(merge.by).gather(1, tokens.origin) if merge.by is not None and op.spec.by == "score" \
        else None
    patches = evaluator.patches.gather(1, tokens.origin) if evaluator.patches is not None else None
    frames, spots = (getattr(evaluator, name, None) for name in ("frames", "spots"))  # videos (Qwen2-VL)
    rows = MergeRows((members & ~state.protected).gather(1, tokens.origin), receivers.gather(1, tokens.origin),
                     features, patches, weights, frames=frames.gather(1, tokens.origin) if frames is not None else None,
                     spots=spots.gather(1, tokens.origin) if spots is not None else None)
    folding = op.fold(merge, rows, evaluator)
    folded, moved = fold(tokens, folding)
    return folded, moved, folding.order, op.proportional(merge, evaluator)


def compact(tokens: Tokens, state: PrefillState, alive: torch.Tensor, order: torch.Tensor | None) -> Tokens:
    """Keep the alive rows (in `order`, else in their order). Images keeping fewer rows than others are
    padded with dead rows, marked invalid in `state` (masked as attention keys, never selected)."""
    if order is not None:
        tokens = tokens.rows(order)
    keep = alive.gather(1, tokens.origin)
    counts = keep.sum(1)
    tokens = tokens.rows(selected_first(keep)[:, : int(counts.max()) if counts.numel() else 0])
    real = torch.arange(tokens.origin.shape[1], device=counts.device)[None] < counts[:, None]
    state.kept = tokens.origin
    state.valid = torch.zeros_like(state.valid).scatter(1, tokens.origin, real)
    return tokens


def scatter_rows(tokens: Tokens, alive_rows: torch.Tensor, width: int, base: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each alive row's features into its representative's position: ([I, width, C], [I, width] bool kept). With
    riders, C counts their channels too (`Tokens.values`; `base` holds them as well)."""
    values = tokens.values
    images, _, channels = values.shape
    slot = torch.where(alive_rows, tokens.first, width)
    out = tokens.hidden.new_zeros(images, width + 1, channels) if base is None else \
        torch.cat([base, base.new_zeros(images, 1, channels)], dim=1)
    out = out.scatter(1, slot[:, :, None].expand(-1, -1, channels), values)
    kept = torch.zeros(images, width + 1, dtype=torch.bool, device=slot.device).scatter(1, slot, True)
    return out[:, :width], kept[:, :width]


def code_order(plan: Plan) -> bool:
    """Whether the encoder's merges hand the LLM their tokens in the order they leave the rows (`bipartite(...,
    order=code)`: ToMe's code order) rather than each at its earliest patch (`spatial`, the default). Fails at
    the merge where that cannot hold: `bipartite` merges that choose differently, `order=code` outside encoder
    layers (the rows of `encoder.output` and `projector.output` stages keep their slots' order), or on a tower
    whose rows do not reach the LLM as they are (connectors that read every patch, Qwen2-VL's packed tower)."""
    chosen: list[tuple[str, ir.Merge]] = []
    for stage in plan.stages:
        def literal(expr: ir.Expr, stage: BoundStage = stage) -> ir.Expr:
            return stage.values.get(expr.id, expr) if isinstance(expr, ir.Name) else expr

        for merge in (st for st in stage.statements if isinstance(st, ir.Merge)):
            order = MERGE_OPS[merge.method].llm_order(merge, literal)
            in_layers = stage.kind == "encoder" and stage.point != "encoder.output"
            if order == "code" and not in_layers:
                raise PolicyError.at(f"order=code (ToMe's code order) is for merges inside encoder layers: the "
                                     f"tokens of a {stage.point} stage keep their slots' order", merge.span,
                                     "merge in encoder.layer[...] stages, or leave `order` out (spatial)")
            if order is not None and in_layers:
                chosen.append((order, merge))
    orders = {order for order, _ in chosen}
    if len(orders) > 1:
        merge = next(m for order, m in chosen if order != chosen[0][0])
        raise PolicyError.at(f"the encoder's merges ask for two orders of the LLM's tokens: {chosen[0][0]} first, "
                             f"{'code' if chosen[0][0] == 'spatial' else 'spatial'} here", merge.span,
                             "give every `bipartite` merge the same `order` (spatial when left out)")
    adapter = plan.adapter
    if orders == {"code"} and (adapter.encoder_unmerges or adapter.encoder_packed):
        why = "tower packs the images and its LLM places each token by its patch (M-RoPE)" if adapter.encoder_packed \
            else "connector reads every patch (merged tokens are unmerged for it)"
        raise PolicyError.at(f"order=code needs the encoder's rows to reach the LLM as they are, but "
                             f"{adapter.family}'s {why}: the LLM sees the model's own order",
                             chosen[0][1].span, "leave `order` out (spatial)")
    return orders == {"code"}


def in_rank_order(features: torch.Tensor, kept: torch.Tensor, protected: torch.Tensor, rank: torch.Tensor,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept slots' features [I, N, D] and protected flags [I, N] moved among the kept slots ([I, N] bool) so
    that, read in slot order (the order the LLM receives them), they come by ascending `rank` [I, N] (each
    slot's row in the encoder's row order: ToMe's code order). Other slots stay."""
    slots = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    by_slot = selected_first(kept)  # the kept slots, ascending, then the others
    by_rank = torch.sort(torch.where(kept, rank, rank.max() + 1 + slots), dim=1, stable=True).indices
    source = torch.empty_like(by_slot).scatter_(1, by_slot, by_rank)  # slot s takes the row of slot source[s]
    return features.gather(1, source[:, :, None].expand_as(features)), protected.gather(1, source)


def unpack(packed: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images packed one after another, [sum(sizes), C], as rows of a batch padded with zeros to the widest:
    ([I, max(sizes), C], [I, max(sizes)] bool: which rows hold a token). `padded[valid]` packs them again."""
    width = max(sizes, default=0)
    valid = torch.arange(width, device=packed.device)[None, :] < torch.tensor(sizes, device=packed.device)[:, None]
    padded = packed.new_zeros(len(sizes), width, packed.shape[-1])
    padded[valid] = packed
    return padded, valid
