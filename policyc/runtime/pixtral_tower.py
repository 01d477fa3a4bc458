"""Encoder merges in Mistral 3's packed Pixtral tower: ToMe (arXiv:2210.09461) inside the layers, undone before the
projector's 2x2 patch merger (ToMe for Stable Diffusion's unmerge, arXiv:2303.17604).

`PixtralVisionModel` crops every image to its size (`image_sizes`, pixels), cuts it into patches in raster order and
packs all images into one sequence [1, sum P_i, C]; a block-diagonal mask keeps each image attending to itself, and
2-D rotary embeddings (cos, sin [sum P_i, d], handed to every layer) place each patch. The projector reads the
feature layer's output, per image in raster order (its merger folds each 2x2 block of patches).

How policyc runs encoder merges there:
- Each image is one merge set: tokens never merge across images, and `r` is per image.
- Layers run as the model's own until a layer has a stage; from then on policyc runs each layer's parts itself
  (attention_norm, q/k/v, the model's rotary at each row's own patch, attention, o_proj, ffn_norm, feed_forward) on
  the live rows, attending within each image, with log(size) added to every key's logit after a proportional merge.
  A merged group keeps its receiver's rotary embedding.
- The `keys` a merge reads are the layer's post-rotary keys (what its attention uses).
- At the tower's output every patch takes the row its token was merged into: `last_hidden_state` and the feature
  layer's hidden state (what `get_image_features` hands the projector) hold every patch, so the merger, the LLM's
  token count and the prompt are the model's own: ToMe saves encoder compute only.
- `ImageStages.merged_into` is [sum P_i] long over the packed patches (the row whose token holds each patch);
  `encoder_rows` [images, layers] the rows each image ran on (the compile report's FLOPs).

`PixtralEncoder` has the interface of `policyc.runtime.qwen_tower.PackedEncoder` (built from `ImageStages`,
`install()`, `remove()`); what it cannot run fails at compile time (`refuse_unpacked`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from policyc.compiler.plan import BoundStage
from policyc.errors import PolicyError
from policyc.runtime.evaluate import Captured, PrefillState
from policyc.runtime.patching import LayerWrapper
from policyc.runtime.qwen_tower import refuse_unpacked
from policyc.runtime.vision_evaluate import VisionEvaluator
from policyc.runtime.vision_tokens import Tokens, compact, run_statements

if TYPE_CHECKING:
    from policyc.runtime.vision import ImageStages


@dataclass
class PixtralRun:
    """One forward of the tower: each image's live rows ([1, R_i, C] Tokens, positions within the image)."""

    tokens: list[Tokens]
    starts: list[int]  # each image's first position in the packed sequence
    position: tuple[torch.Tensor, torch.Tensor]  # the tower's rotary (cos, sin) per packed position, [N, d] each
    total: int  # N: patches packed
    changed: bool = False  # a stage ran: layers run on the live rows
    proportional: bool = False  # a merge asked for log(size) attention biases
    query: torch.Tensor | None = None  # [N, H, d] this layer's post-rotary queries at the live rows' positions
    key: torch.Tensor | None = None
    scaling: float = 1.0
    features: torch.Tensor | None = None  # [N, C] the feature layer's output, unmerged
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [images] live rows

    def counts(self) -> list[int]:
        return [t.origin.shape[1] for t in self.tokens]

    def positions(self) -> torch.Tensor:
        """[N'] long: the packed position of every live row, image after image."""
        return torch.cat([start + t.origin[0] for start, t in zip(self.starts, self.tokens, strict=True)])

    def unmerged(self, hidden: torch.Tensor) -> torch.Tensor:
        """The live rows [N', C] at every packed position [N, C]: each patch takes its token's row."""
        pieces = torch.split(hidden, self.counts())
        return torch.cat([t.unmerged(piece[None])[0] for t, piece in zip(self.tokens, pieces, strict=True)])


class PixtralLayer(LayerWrapper):
    """A Pixtral layer: the model's own until a stage changes the tokens, then its parts on the live rows, with the
    stages at `encoder.layer[i].attention` (between attention and MLP) and `encoder.layer[i]`."""

    def __init__(self, inner: nn.Module, index: int, owner: PixtralEncoder) -> None:
        super().__init__(inner, index)
        self.owner = owner
        self.inside = owner.stages.stages_at("encoder.layer.attention", index)
        self.after = owner.stages.stages_at("encoder.layer", index)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: object) -> torch.Tensor:
        owner = self.owner
        if self.index == 0:
            owner.begin(hidden_states, position_embeddings)
        run = owner.run
        if run is None:
            return self.inner(hidden_states, attention_mask, position_embeddings=position_embeddings, **kwargs)
        run.rows[self.index] = torch.tensor(run.counts())
        if not (run.changed or self.inside or self.after):
            output = self.inner(hidden_states, attention_mask, position_embeddings=position_embeddings, **kwargs)
        else:
            layer = self.inner
            hidden = owner.attend(layer, hidden_states[0])
            if self.inside:
                hidden = owner.apply(self.inside, hidden, self.index)
            hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
            if self.after:
                hidden = owner.apply(self.after, hidden, self.index)
            output = hidden[None]
        if self.index == owner.adapter.feature_encoder_layer:
            run.features = run.unmerged(output[0])
        return output


class PixtralEncoder:
    """The encoder stages of a plan on Mistral 3's packed Pixtral tower (built at compile time: refuses what it
    cannot run)."""

    def __init__(self, stages: ImageStages) -> None:
        refuse_unpacked(stages.plan)
        self.stages = stages
        self.adapter = stages.adapter
        self.tower = self.adapter.vision_tower
        self.patch = int(self.tower.config.patch_size)
        self.run: PixtralRun | None = None
        self._sizes: torch.Tensor | None = None
        self._wrapped: list[tuple[int, nn.Module]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self) -> None:
        layers = self.adapter.vision_layers
        for index, inner in enumerate(layers):
            layers[index] = PixtralLayer(inner, index, self)
            self._wrapped.append((index, inner))
        self._handles.append(self.tower.register_forward_pre_hook(self._on_tower_input, with_kwargs=True))
        self._handles.append(self.tower.register_forward_hook(self._on_tower_output))

    def remove(self) -> None:
        for index, inner in self._wrapped:
            self.adapter.vision_layers[index] = inner
        for handle in self._handles:
            handle.remove()
        self._wrapped.clear()
        self._handles.clear()
        self.run = None

    # ---------------------------------------------------------------- one forward
    def _on_tower_input(self, module: nn.Module, args: tuple, kwargs: dict[str, object]) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        sizes = kwargs.get("image_sizes", args[1] if len(args) > 1 else None)
        if sizes is None and isinstance(pixels, torch.Tensor):  # the tower's default: every image at full size
            sizes = [tuple(pixels.shape[-2:])] * pixels.shape[0]
        self._sizes = torch.as_tensor(sizes).reshape(-1, 2).cpu()

    def begin(self, hidden: torch.Tensor, position: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The merge sets of this forward: one per image, its patches in raster order, packed image after image."""
        if self._sizes is None or position is None:
            raise PolicyError.at("the Pixtral tower's layers ran without image_sizes or rotary embeddings", None)
        patches = ((self._sizes[:, 0] // self.patch) * (self._sizes[:, 1] // self.patch)).tolist()
        if sum(patches) != hidden.shape[1]:
            raise PolicyError.at(f"the Pixtral tower packed {hidden.shape[1]} patches for image sizes giving "
                                 f"{sum(patches)}", None)
        starts = torch.tensor([0, *patches]).cumsum(0).tolist()
        tokens = [Tokens.start(hidden[:, start:start + count]) for start, count in zip(starts, patches, strict=False)]
        cos, sin = (e.reshape(-1, e.shape[-1]) for e in position)
        self.run = PixtralRun(tokens, starts[:-1], (cos, sin), hidden.shape[1])

    def attend(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + the layer's attention on the live rows [N', C], within each image, each row at its own patch's
        rotary embedding, log(size) added to the keys' logits after a proportional merge."""
        run = self.run
        assert run is not None  # begin() ran at layer 0
        attention = layer.attention
        heads = attention.num_heads
        rows = hidden.shape[0]
        normed = layer.attention_norm(hidden)
        q, k, v = (projection(normed).view(rows, heads, -1).transpose(0, 1)[None]
                   for projection in (attention.q_proj, attention.k_proj, attention.v_proj))  # [1, H, N', d]
        positions = run.positions()
        cos, sin = (e[positions] for e in run.position)
        q, k = sys.modules[type(attention).__module__].apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
        size = torch.cat([t.size[0] for t in run.tokens])
        outputs, start = [], 0
        for count in run.counts():
            span = slice(start, start + count)
            bias = size[span].log().to(q.dtype)[None, None, None, :] if run.proportional else None
            outputs.append(nn.functional.scaled_dot_product_attention(q[:, :, span], k[:, :, span], v[:, :, span],
                                                                      attn_mask=bias, scale=attention.scaling))
            start += count
        run.scaling = float(attention.scaling)
        run.query = q.new_zeros(run.total, heads, q.shape[-1]).index_copy(0, positions, q[0].transpose(0, 1))
        run.key = k.new_zeros(run.total, heads, k.shape[-1]).index_copy(0, positions, k[0].transpose(0, 1))
        attended = torch.cat(outputs, dim=2)[0].transpose(0, 1).reshape(rows, -1)
        return hidden + attention.o_proj(attended)

    def apply(self, stages: list[BoundStage], hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Run `stages` on the live rows `hidden` [N', C], image by image; returns the rows left, packed."""
        run = self.run
        assert run is not None and run.query is not None and run.key is not None
        for stage in stages:
            pieces = list(torch.split(hidden, run.counts()))
            for image, tokens in enumerate(run.tokens):
                tokens = Tokens(pieces[image][None], tokens.origin, tokens.first, tokens.size, tokens.owner)
                assert tokens.owner is not None  # Tokens.start tracks the owners
                width = tokens.owner.shape[1]
                at = run.starts[image] + tokens.origin[0]
                captured = Captured(run.query[at][None].transpose(1, 2), run.key[at][None].transpose(1, 2),
                                    run.scaling)
                patch = torch.ones(1, width, dtype=torch.bool, device=hidden.device)
                state = PrefillState(patch, torch.zeros_like(patch).scatter(1, tokens.origin, True), tokens.origin,
                                     torch.zeros_like(patch))
                evaluator = VisionEvaluator(state, captured, dict(stage.values), seed_offset=layer, causal=False,
                                            hidden=tokens.hidden, cls=torch.zeros_like(patch),
                                            patches=torch.arange(width, device=hidden.device)[None],
                                            layer_count=len(self.adapter.vision_layers), layer=layer,
                                            stage_layers=stage.layers or (layer,), label=stage.label)
                tokens, alive, order, proportional = run_statements(stage, evaluator, tokens)
                tokens = compact(tokens, state, alive, order)
                run.proportional = run.proportional or proportional
                count = int(state.valid.sum())
                run.tokens[image] = Tokens(tokens.hidden[:, :count], tokens.origin[:, :count],
                                           tokens.first[:, :count], tokens.size[:, :count], tokens.owner)
                pieces[image] = tokens.hidden[0, :count]
            hidden = torch.cat(pieces)
        run.changed = True
        return hidden

    # ---------------------------------------------------------------- the tower's output
    def _on_tower_output(self, module: nn.Module, args: tuple, output: object) -> object:
        """Every patch of `last_hidden_state` and of the feature layer's hidden state takes its token's row."""
        run, adapter = self.run, self.adapter
        if run is None:
            return output
        self.run = None
        if run.changed:
            output["last_hidden_state"] = run.unmerged(output["last_hidden_state"][0])[None]  # type: ignore[index]
            if getattr(output, "hidden_states", None) is not None and run.features is not None:
                hidden_states: list[torch.Tensor | None] = [None] * (len(adapter.vision_layers) + 1)
                hidden_states[adapter.feature_layer] = run.features[None]
                output["hidden_states"] = tuple(hidden_states)  # type: ignore[index]
        self.stages.merged_into = torch.cat([start + t.owner[0] for start, t in zip(run.starts, run.tokens,
                                                                                     strict=True)])
        count = len(adapter.vision_layers)
        skipped = torch.zeros(len(run.tokens), dtype=torch.long)
        self.stages.encoder_rows = torch.stack([run.rows.get(k, skipped) for k in range(count)], 1)
        return output


__all__ = ["PixtralEncoder", "PixtralLayer", "PixtralRun"]
