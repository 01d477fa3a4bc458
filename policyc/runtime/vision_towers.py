"""How the runtime runs one vision tower's layers, whatever the family: the wrapper that runs a layer on the
rows still alive (`VisionLayer`), the two halves of a layer (`LayerBody`: attention, then MLP, for the pre-norm
CLIP/SigLIP/Idefics3 layers and InternViT's layer-scaled ones), and what "unmerge" families need.

Unmerge families (`ModelAdapter.encoder_unmerges`: Idefics3/SmolVLM and InternVL pixel shuffle, Gemma 3's 4x4
pooling) have connectors that need every patch of the grid. Encoder merges still run on the live rows (later
encoder layers see fewer tokens: the encoder saves compute), and at the tower's output every patch position takes
the value of the token it was merged into (ToMe for Stable Diffusion's unmerge), so the connector, the
placeholders and the LLM see the model's own layout: the LLM's token count is the connector's. What cannot be
unmerged (a dropped token leaves no value behind) fails at compile time, at its statement.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from policyc.compiler.plan import Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.passes import MERGE_OPS
from policyc.runtime.patching import LayerWrapper

if TYPE_CHECKING:
    from policyc.runtime.vision import ImageStages


class LayerBody:
    """A pre-norm encoder layer (CLIP, SigLIP, Idefics3): x + attn(ln1(x)), then x + mlp(ln2(x))."""

    parts = ("layer_norm1", "self_attn", "layer_norm2", "mlp")

    def attend(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
               kwargs: dict[str, object]) -> torch.Tensor:
        attended, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=mask, **kwargs)
        return hidden + attended

    def feed(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + layer.mlp(layer.layer_norm2(hidden))

    def whole(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
              kwargs: dict[str, object]) -> torch.Tensor:
        return layer(hidden, mask, **kwargs)

    def values(self, layer: nn.Module, attention: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's attention values [I, H, R, d] on `hidden` [I, R, C]."""
        values = attention.v_proj(getattr(layer, self.parts[0])(hidden))
        return values.view(*values.shape[:2], attention.num_heads, -1).transpose(1, 2)


class LayerScaledBody(LayerBody):
    """InternViT's layer: x + lambda_1 * attn(norm_before(x)), then x + lambda_2 * mlp(norm_after(x)). Its
    forward takes no attention mask: with one (ToMe's log(size) bias, padding rows) it runs in halves."""

    parts = ("layernorm_before", "attention", "layernorm_after", "mlp")

    def attend(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
               kwargs: dict[str, object]) -> torch.Tensor:
        attended, _ = layer.attention(layer.layernorm_before(hidden), attention_mask=mask, **kwargs)
        return hidden + layer.lambda_1 * attended

    def feed(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        out = layer.dropout(layer.mlp(layer.layernorm_after(hidden)))
        return hidden + (out if layer.lambda_2 is None else layer.lambda_2 * out)

    def whole(self, layer: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None,
              kwargs: dict[str, object]) -> torch.Tensor:
        return layer(hidden) if mask is None else self.feed(layer, self.attend(layer, hidden, mask, kwargs))


def layer_body(layer: nn.Module) -> LayerBody | None:
    """The body that runs `layer` in halves, or None when its parts are not recognised."""
    for body in (LayerBody(), LayerScaledBody()):
        if all(hasattr(layer, part) for part in body.parts):
            return body
    return None


class VisionLayer(LayerWrapper):
    """An encoder layer that runs on the rows still alive and applies the stages bound to it."""

    def __init__(self, inner: nn.Module, index: int, owner: ImageStages, body: LayerBody) -> None:
        super().__init__(inner, index)
        self.owner = owner
        self.body = body
        self.inside = owner.stages_at("encoder.layer.attention", index)
        self.after = owner.stages_at("encoder.layer", index)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: object) -> torch.Tensor:
        owner, body = self.owner, self.body
        if self.index == 0:
            owner.begin(hidden_states, attention_mask)
        run = owner.run
        if run is None or self.index > owner.last_layer:
            return hidden_states
        mask = run.attention_mask(attention_mask, hidden_states.dtype)
        run.rows[self.index] = run.state.valid.gather(1, run.tokens.origin).sum(1)  # for the compile report's FLOPs
        if self.index in owner.value_layers:  # value_norm, attention(space=values): one more v_proj, on these rows
            attention = owner.adapter.vision_attention[self.index]
            run.values[self.index] = (body.values(self.inner, attention, hidden_states), run.tokens.origin)
        if self.inside:
            hidden = owner.apply(self.inside, body.attend(self.inner, hidden_states, mask, kwargs), self.index)
            output = body.feed(self.inner, hidden)
        else:
            output = body.whole(self.inner, hidden_states, mask, kwargs)
        if self.after:
            output = owner.apply(self.after, output, self.index)
        if self.index == owner.adapter.feature_encoder_layer:
            run.features = replace(run.tokens, hidden=output)
        return output


def padding_keys(mask: torch.Tensor | None) -> torch.Tensor | None:
    """From the mask a tower gives its first layer ([I, 1, P, P]; bool: allowed, float: additive), the positions
    no query may attend to ([I, P] bool: Idefics3's padded patches); None without a mask. Later layers run on fewer
    rows than the tower's mask has, so the runtime rebuilds it from these."""
    if mask is None:
        return None
    allowed = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
    return ~allowed.any(1)


def refuse_unmergeable(plan: Plan) -> None:
    """On unmerge families, encoder statements whose result has no value at some patch (keep, drop, and stages at
    `encoder.output`, which select what reaches the connector) fail at their statement; so do what would carry
    across the connector to later stages (protect, and sets or scores a later stage reads), which the connector's
    folding of patches into tokens gives no meaning yet."""
    adapter = plan.adapter
    problems = []
    hint = "merge in the encoder (e.g. tome), or drop after the connector: " + (
        "at projector.output (e.g. divprune) or in the LLM (e.g. fastv)" if adapter.projector_unsupported is None
        else "in the LLM (e.g. fastv)")
    why = (f"{adapter.family}'s connector needs every patch of the encoder's grid, so encoder stages may only merge, "
           "inside encoder layers (merged tokens are unmerged where the connector reads the encoder, each patch taking "
           "its token's value: the encoder saves compute, the LLM sees every token)")
    for stage in plan.stages:
        if stage.kind != "encoder":
            continue
        if stage.point == "encoder.output":
            problems.append(PolicyError.at(f"stage {stage.label} would choose what the connector reads, but {why}",
                                           stage.span, hint))
            continue
        for statement in stage.statements:
            if isinstance(statement, ir.Keep | ir.Drop):
                verb = "keep" if isinstance(statement, ir.Keep) else "drop"
                problems.append(PolicyError.at(f"`{verb}` in encoder stage {stage.label} removes tokens, but {why}",
                                               statement.span, hint))
            if isinstance(statement, ir.Merge) and not MERGE_OPS[statement.method].unmerges:
                problems.append(PolicyError.at(
                    f"merge {statement.method} in encoder stage {stage.label} spreads each token over several rows, "
                    f"so no row holds its patch for {adapter.family}'s connector, which reads every patch",
                    statement.span, hint))
            if isinstance(statement, ir.Protect):
                problems.append(PolicyError.at(
                    f"`protect` in encoder stage {stage.label} would carry across {adapter.family}'s connector, which "
                    "folds several patches into each LLM token: not defined yet", statement.span,
                    "protect tokens in the stage that drops them (at projector.output or in the LLM)"))
    defined = {st.name for s in plan.stages if s.kind == "encoder" for st in s.statements
               if isinstance(st, ir.Let | ir.ScoreDef)}
    for stage in plan.stages:
        if stage.kind == "encoder":
            continue
        for node in (n for st in stage.statements for n in st.walk()):
            if isinstance(node, ir.Name) and node.id in defined:
                problems.append(PolicyError.at(
                    f"{node.id} is defined in an encoder stage, whose sets and scores do not cross "
                    f"{adapter.family}'s connector (it folds several patches into each LLM token)", node.span,
                    "define it in this stage"))
    if problems:
        raise PolicyError([d for p in problems for d in p.diagnostics])


__all__ = ["LayerBody", "LayerScaledBody", "VisionLayer", "layer_body", "padding_keys", "refuse_unmergeable"]
