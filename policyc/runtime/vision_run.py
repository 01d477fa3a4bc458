"""One vision forward's bookkeeping: `Space`, the positions a kind of stage acts on (the encoder's CLS + patches
or the projector's slots), and `VisionRun`, the live rows of one forward and what its stages recorded (queries,
keys, values, sizes for ToMe's proportional attention). Used by `ImageStages` (vision.py) and the towers."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from policyc.compiler.plan import BoundStage
from policyc.errors import PolicyError
from policyc.runtime.evaluate import Captured, PrefillState, StageEvaluator
from policyc.runtime.vision_evaluate import LayerAttention, VisionEvaluator
from policyc.runtime.vision_tokens import Tokens


@dataclass(frozen=True)
class Space:
    """Positions of one kind of stage: the encoder's tokens (CLS + patches) or the projector's slots."""

    image: torch.Tensor  # [P] bool: patch positions
    patches: torch.Tensor  # [P] long: patch index, -1 for CLS
    cls: torch.Tensor  # [P] bool
    grid: tuple[int, int] | None  # None: images of their own sizes (geometric operators fail at compile time)

    def evaluator(self, state: PrefillState, stage: BoundStage, captured: Captured | None, hidden: torch.Tensor,
                  layer: int, run: VisionRun | None = None, layer_count: int = 0,
                  **projector: object) -> StageEvaluator:
        batch = state.image.shape[0]
        return VisionEvaluator(state, captured, dict(stage.values), seed_offset=layer, causal=False,
                               hidden=hidden, cls=self.cls.expand(batch, -1), patches=self.patches.expand(batch, -1),
                               grid=self.grid, earlier_attention=run.earlier if run is not None else None,
                               attention_values=run.values_at(layer) if run is not None else None,
                               memory=run.memory if run is not None else {}, layer_count=layer_count, layer=layer,
                               encoder_input=run.embedded if run is not None else None,
                               stage_layers=stage.layers or (layer,), label=stage.label,
                               **projector)  # type: ignore[arg-type]

    def state(self, batch: int, valid: torch.Tensor | None = None) -> PrefillState:
        image = self.image.expand(batch, -1)
        positions = torch.arange(image.shape[1], device=image.device).expand(batch, -1)
        return PrefillState(image, torch.ones_like(image) if valid is None else valid, positions,
                            torch.zeros_like(image))


@dataclass
class VisionRun:
    """One vision forward: the live rows, what the stages know, and the features at the feature layer."""

    tokens: Tokens
    state: PrefillState
    proportional: bool = False  # a ToMe merge asked for log(size) attention biases
    captured: dict[int, LayerAttention] = field(default_factory=dict)  # the recorded layers' queries and keys
    values: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layer -> ([I,H,R,d], origin)
    memory: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # ema() state across a stage's layers
    features: Tokens | None = None  # the rows at the feature layer
    rows: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [I] real rows each image ran there
    padded: torch.Tensor | None = None  # [I, P] bool: positions the tower masks as keys (Idefics3's padded patches)
    embedded: torch.Tensor | None = None  # [I, P, C] the first encoder layer's input rows (GTP-ViT's graph)

    def attention_mask(self, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The encoder's attention mask plus ToMe's log(size) and -inf for padding rows: [I, 1, 1, R]. Where the
        tower masks padded patches, that mask is rebuilt on the current rows (its own has the original width)."""
        key_valid = self.state.valid.gather(1, self.tokens.origin)
        if self.padded is not None:
            key_valid = key_valid & ~self.padded.gather(1, self.tokens.origin)
            mask = None
        if not self.proportional and bool(key_valid.all()):
            return mask
        bias = self.tokens.size.log() if self.proportional else torch.zeros_like(self.tokens.size)
        bias = bias.masked_fill(~key_valid, torch.finfo(dtype).min)[:, None, None, :].to(dtype)
        return bias if mask is None else mask + bias

    def captured_at(self, layer: int) -> Captured | None:
        """The layer's queries and keys, on the current rows (rows merged away since are dropped)."""
        if layer not in self.captured:
            return None
        captured, origin = self.captured[layer].captured, self.captured[layer].origin
        bias = None if captured.bias is None else self._current(captured.bias[:, None, :, None], origin)[:, 0, :, 0]
        return Captured(self._current(captured.query, origin), self._current(captured.key, origin), captured.scaling,
                        bias=bias)

    def values_at(self, layer: int) -> torch.Tensor | None:
        """The layer's attention values [I, H, R', d] on the current rows, where a stage needs them."""
        if layer not in self.values:
            return None
        return self._current(*self.values[layer])

    def _current(self, per_head: torch.Tensor, origin: torch.Tensor) -> torch.Tensor:
        """[I, H, R, d] recorded over rows of original positions `origin` -> the current rows [I, H, R', d]."""
        inverse = torch.zeros_like(self.state.image, dtype=torch.long).scatter(
            1, origin, torch.arange(origin.shape[1], device=origin.device).expand_as(origin))
        rows = inverse.gather(1, self.state.kept)[:, None, :, None]
        return per_head.gather(2, rows.expand(-1, per_head.shape[1], -1, per_head.shape[-1]))

    def earlier(self, layer: int) -> tuple[Captured, torch.Tensor, torch.Tensor]:
        """An encoder layer's queries and keys as it ran: (q/k, row origins [I, R], key rows valid [I, R])."""
        if layer not in self.captured:
            raise PolicyError.at(f"encoder layer {layer}'s attention was not recorded", None)
        recorded = self.captured[layer]
        return recorded.captured, recorded.origin, recorded.key_valid
