"""The eager runtime's stages before the LLM: `encoder.layer[i]`, `encoder.layer[i].attention`,
`encoder.output` and `projector.output`.

- Encoder layers are wrapped (`VisionLayer`, vision_towers.py). Each wrapper runs its layer on the rows still
  alive (real shrinking: later layers see fewer tokens), splits the layer between attention and MLP where a
  `.attention` stage sits, applies the stages after it, and adds log(token size) to later attention logits
  after a proportional ToMe merge. Layers past the feature layer run only when a stage needs them.
- Families whose connector needs every patch (`ModelAdapter.encoder_unmerges`: pixel shuffle, pooling, anyres
  unpadding) get the tower's output unmerged instead: every position takes its merged token's row, and
  encoder statements that would leave a position without a value fail at compile time (vision_towers.py).
- A token keeps its original encoder position as its identity; a merged token is represented by the
  earliest original patch of its group. On LLaVA, at the feature layer the rows are scattered back to every
  position, each into its representative's slot, and handed to LLaVA as `hidden_states[feature_layer]`,
  so the projector, the `<image>` placeholders, masked_scatter and generate() stay untouched.
- `ImageStages.kept` / `.protected` ([images, tokens_per_image] bool) tell the LLM side which image slots
  reach the LLM and which a stage protected.
- Families that assemble an image's LLM tokens after the projector (LLaVA-NeXT/OneVision: unpadded crops, newlines)
  hand them to `projector.output` stages through `ModelAdapter.hook_image_tokens`: separators are no candidates.
  OneVision hands each video the same way, one row per video, with each token's frame and spatial index.
- Projector stages that read the question (`cover`, `text_relevance`) get it from `PromptStash`
  (prompt_stash.py): LLaVA's get_image_features never sees the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from policyc.catalog import SELECTORS
from policyc.compiler.plan import BoundStage, Plan
from policyc.errors import PolicyError
from policyc.lang import ir
from policyc.runtime.attention import register
from policyc.runtime.evaluate import Captured, PrefillState
from policyc.runtime.image_samples import image_samples, video_frames
from policyc.runtime.prompt_stash import PromptStash
from policyc.runtime.qwen_tower import PackedEncoder
from policyc.runtime.vision_evaluate import LayerAttention, read_layers, reads_values
from policyc.runtime.vision_run import Space, VisionRun
from policyc.runtime.vision_tokens import (
    Tokens,
    code_order,
    compact,
    in_rank_order,
    run_statements,
    scatter_rows,
    unpack,
)
from policyc.runtime.vision_towers import LayerBody, VisionLayer, layer_body, padding_keys, refuse_unmergeable


def _name(node: ir.Call | ir.Name) -> str:
    return node.fn if isinstance(node, ir.Call) else node.id


def _reads_question(selector: str) -> bool:
    """Whether a selector reads the question at projector.output (its declaration `needs` it: cover, facility)."""
    return "question" in SELECTORS.specs[selector].needs


def _reads_samples(node: ir.Node) -> bool:
    """Whether `node` needs the prompt each image belongs to: `top(allocate=...)`, `vision[i]`, `image`."""
    return (isinstance(node, ir.Select) and any(k.name == "allocate" for k in node.options)) \
        or isinstance(node, ir.Index) or (isinstance(node, ir.Call | ir.Name) and _name(node) == "image")


class ImageStages:
    """The pre-LLM stages of a plan. After each vision forward, `kept` and `protected` ([images,
    tokens_per_image] bool, images in the order LLaVA scatters them) say which image slots reach the LLM
    and which a stage protected; both are None before the first one (and stay None without such stages)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.adapter = adapter = plan.adapter
        self.kept: torch.Tensor | None = None
        self.protected: torch.Tensor | None = None
        # Per placeholder id, its last forward's kept and protected flags, where images and videos are encoded in
        # separate forwards (LLaVA-OneVision): a prompt holding both gets each at its own placeholders.
        self.by_placeholder: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoder_rows: torch.Tensor | None = None  # [images, encoder layers]: real rows each layer ran on
        self.merged_into: torch.Tensor | None = None  # unmerge families: [images, encoder tokens] long, per position
        # the position whose token holds it after the encoder's merges (itself where it did not merge); Qwen2-VL:
        # [patches] over the rows of pixel_values (qwen_tower.py)
        self.run: VisionRun | None = None
        self._video_forward = False  # a packed tower's forward encodes videos (Qwen2-VL's get_video_features)
        encoder = [s for s in plan.stages if s.kind == "encoder"]
        self.encoder_output = plan.at("encoder.output")
        self.projector_output = plan.at("projector.output")
        self.active = bool(encoder or self.projector_output)
        self.unmerges = adapter.encoder_unmerges  # the connector reads every patch: merges are undone at the output
        if self.unmerges:
            refuse_unmergeable(plan)
        self.code_order = code_order(plan)  # the LLM gets the encoder's rows in their order (ToMe's code order)
        self._ranks: torch.Tensor | None = None  # then: [I, slots] each slot's row in that order
        # a packed tower (every image in one sequence): its own block wrappers, Qwen2-VL's (qwen_tower.py) unless the
        # family names its own (Mistral 3's Pixtral: pixtral_tower.py)
        packed = getattr(adapter, "packed_encoder", None)
        self._packed = (packed or PackedEncoder)(self) if encoder and (adapter.encoder_packed or packed) else None
        stage_layers = {k for s in encoder for k in s.layers}
        feature_layer = adapter.feature_encoder_layer
        needed = {k for s in encoder for k in s.layers if any(not isinstance(st, ir.Merge) for st in s.statements)}
        self.last_layer = max([feature_layer, *(k for k in stage_layers if k <= feature_layer), *needed])
        self.recorded = stage_layers | ({adapter.feature_encoder_layer} if self.encoder_output else set())
        count = len(adapter.vision_layers)
        for stage in encoder:
            for layer in stage.layers or (feature_layer,):
                self.recorded.update(read_layers(stage.statements, stage.values, count, layer))
        self.recorded.discard(-1)
        self.value_layers = {k for s in encoder for k in s.layers if reads_values(s.statements)}
        device = next(adapter.vision_tower.parameters()).device
        cls = int(adapter.has_cls)
        grid = adapter.patch_grid or adapter.encoder_grid  # anyres: every crop has the tower's own grid
        tokens = torch.arange(grid[0] * grid[1] + cls if grid is not None else cls, device=device)
        self.encoder_space = Space(tokens >= cls, tokens - cls, tokens < cls, grid)
        positions = torch.arange(adapter.vision_tokens, device=device)
        slots = positions[adapter.feature_start:]
        self.slot_space = Space(slots >= cls, slots - cls, slots < cls, adapter.patch_grid)
        if adapter.tokens_per_image is not None and adapter.token_grid != adapter.patch_grid:  # tokens fold patches
            slots = torch.arange(adapter.tokens_per_image, device=device)  # (tiles; Gemma 3's pooled grid)
            self.slot_space = Space(slots >= 0, slots, slots < 0, adapter.token_grid)
        self._wrapped: list[tuple[int, nn.Module]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._undo: list[Callable[[], None]] = []
        self._attention: str | None = None
        self._slots: tuple[Tokens, PrefillState] | None = None
        self._encoder = bool(encoder)
        self._reads_prompt = any((isinstance(node, ir.Select) and _reads_question(node.selector))
                                 or (isinstance(node, ir.Call | ir.Name) and _name(node) == "text_relevance")
                                 for s in self.projector_output for st in s.statements for node in st.walk())
        self._reads_samples = any(_reads_samples(node) for s in self.projector_output for st in s.statements
                                  for node in st.walk())
        # the question, for cover(); the prompt each image belongs to, for top(allocate=...) and vision[i]
        self._prompt = PromptStash(adapter) if self._reads_prompt or self._reads_samples else None

    def stages_at(self, point: str, layer: int) -> list[BoundStage]:
        """The stages at an encoder layer. Past the feature layer merges change nothing LLaVA reads: left out."""
        stages = self.plan.at(point, layer)
        if layer > self.adapter.feature_encoder_layer:
            stages = [replace(s, statements=tuple(st for st in s.statements if not isinstance(st, ir.Merge)))
                      for s in stages]
        return [s for s in stages if s.statements]

    # ---------------------------------------------------------------- installation
    def install(self) -> None:
        if not self.active:
            return
        adapter = self.adapter
        if self._packed is not None:
            self._packed.install()
        elif self._encoder:
            bodies = [layer_body(layer) for layer in adapter.vision_layers]
            for stage in self.plan.at("encoder.layer.attention"):
                if any(bodies[k] is None for k in stage.layers):
                    raise PolicyError.at(f"{stage.label} splits encoder layers between attention and MLP, but their "
                                         "parts are not recognised (pre-norm layer_norm1, self_attn, layer_norm2, "
                                         "mlp; or InternViT's layernorm_before, attention, layernorm_after, mlp)",
                                         stage.span)
            for index, inner in enumerate(adapter.vision_layers):
                adapter.vision_layers[index] = VisionLayer(inner, index, self, bodies[index] or LayerBody())
                self._wrapped.append((index, inner))
            for index in self.recorded:
                adapter.vision_attention[index]._policyc_recorder = self._recorder(index)
            config = adapter.vision_tower.config
            self._attention = config._attn_implementation
            config._attn_implementation = register()
            on_output = self._on_unmerged_tower_output if self.unmerges else self._on_tower_output
            self._handles.append(adapter.vision_tower.register_forward_hook(on_output))
        undo = adapter.hook_image_tokens(self._on_image_tokens) if self.projector_output else None
        if undo is not None:  # the LLM's tokens of an image are assembled after the projector (anyres, newlines)
            self._undo.append(undo)
        elif adapter.tokens_per_image is None:  # packed images of their own sizes (Qwen2-VL): the tower's output
            if not self.unmerges or adapter.encoder_packed:
                self._handles.append(adapter.vision_tower.register_forward_hook(self._on_packed_tower,
                                                                                 with_kwargs=True))
                undo_videos = adapter.track_video_forwards(self._mark_video_forward)
                if undo_videos is not None:  # images and videos in two tower forwards: each fills its placeholders
                    self._undo.append(undo_videos)
        else:
            self._handles.append(adapter.projector.register_forward_hook(self._on_projector_output))
        if self._prompt is not None:
            self._prompt.install()

    def remove(self) -> None:
        adapter = self.adapter
        if self._packed is not None:
            self._packed.remove()
        for index, inner in self._wrapped:
            adapter.vision_layers[index] = inner
        for index in self.recorded:
            if hasattr(adapter.vision_attention[index], "_policyc_recorder"):
                del adapter.vision_attention[index]._policyc_recorder
        if self._attention is not None:
            adapter.vision_tower.config._attn_implementation = self._attention
        for handle in self._handles:
            handle.remove()
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        if self._prompt is not None:
            self._prompt.remove()
        self._wrapped.clear()
        self._handles.clear()
        self._attention = None

    def _recorder(self, index: int):  # type: ignore[no-untyped-def]
        def record(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
            if self.run is not None:
                origin = self.run.tokens.origin
                bias = self.run.tokens.size.log() if self.run.proportional else None  # proportional attention's
                self.run.captured[index] = LayerAttention(Captured(query, key, scaling, bias=bias), origin,
                                                          self.run.state.valid.gather(1, origin))
        return record

    # ---------------------------------------------------------------- the encoder
    def begin(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        tokens = Tokens.start(hidden)
        self.run = VisionRun(tokens, self.encoder_space.state(hidden.shape[0]), embedded=hidden)
        if self.unmerges and (padded := padding_keys(mask)) is not None:  # never merged, masked as keys
            self.run.padded = padded
            self.run.state.image = self.run.state.image & ~padded
        self._slots = None
        if self.adapter.feature_encoder_layer == -1:
            self.run.features = tokens

    def apply(self, stages: list[BoundStage], hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Run `stages` on the rows `hidden` after encoder layer `layer` (or inside it); returns the kept rows."""
        run = self.run
        assert run is not None  # begin() ran at layer 0
        tokens = replace(run.tokens, hidden=hidden)
        for stage in stages:
            evaluator = self.encoder_space.evaluator(run.state, stage, run.captured_at(layer), tokens.hidden, layer,
                                                     run, len(self.adapter.vision_layers))
            tokens, alive, order, proportional = run_statements(stage, evaluator, tokens)
            run.proportional = run.proportional or proportional
            tokens = compact(tokens, run.state, alive, order)
        run.tokens = tokens
        return tokens.hidden

    def _on_tower_output(self, module: nn.Module, args: tuple, output: object) -> object:
        run, adapter = self.run, self.adapter
        if run is None or run.features is None:
            return output
        features = run.features
        live = torch.zeros_like(run.state.valid).scatter(1, run.state.kept, run.state.valid.gather(1, run.state.kept))
        if features.spread is not None:  # Expedit's reconstruction: every position rebuilt from the cluster rows
            features = features.reconstructed(live.gather(1, features.origin))
            live = torch.ones_like(live)
        state = replace(run.state, valid=live, kept=features.origin)
        alive = live
        for stage in self.encoder_output:
            evaluator = self.encoder_space.evaluator(state, stage, run.captured_at(adapter.feature_encoder_layer),
                                                     features.hidden, adapter.feature_encoder_layer, run,
                                                     len(adapter.vision_layers))
            features, alive, _, _ = run_statements(stage, evaluator, features)
            state.valid = alive & state.valid
        alive_rows = state.valid.gather(1, features.origin)
        scattered, _ = scatter_rows(features, alive_rows, adapter.vision_tokens)
        hidden_states = [None] * (len(adapter.vision_layers) + 1)
        hidden_states[adapter.feature_layer] = scattered
        output["hidden_states"] = tuple(hidden_states)  # type: ignore[index]
        self._slots = self._to_slots(features, state, alive_rows)
        skipped = torch.zeros_like(run.state.valid[:, 0], dtype=torch.long)  # layers past the last one a stage needs
        self.encoder_rows = torch.stack([run.rows.get(k, skipped) for k in range(len(adapter.vision_layers))], 1)
        self.run = None
        return output

    def _on_unmerged_tower_output(self, module: nn.Module, args: tuple, output: object) -> object:
        """Unmerge families: every patch position of `last_hidden_state` (and of the feature layer's hidden state,
        where the model asked for hidden states) takes its merged token's row, so the connector reads the full grid
        (CLS included where the tower has one)."""
        run, adapter = self.run, self.adapter
        if run is None or run.features is None:
            return output
        output["last_hidden_state"] = run.tokens.unmerged(output["last_hidden_state"])  # type: ignore[index]
        if getattr(output, "hidden_states", None) is not None:  # LLaVA-NeXT reads hidden_states[feature_layer]
            hidden_states = [None] * (len(adapter.vision_layers) + 1)
            hidden_states[adapter.feature_layer] = run.features.unmerged(run.features.hidden)
            output["hidden_states"] = tuple(hidden_states)  # type: ignore[index]
        self.merged_into = run.features.owner
        skipped = torch.zeros_like(run.state.valid[:, 0], dtype=torch.long)
        # Anyres towers encode crops, which the compile report's per-image FLOPs cannot place: counted at full size.
        self.encoder_rows = None if adapter.tokens_per_image is None else \
            torch.stack([run.rows.get(k, skipped) for k in range(len(adapter.vision_layers))], 1)
        self.run = None
        return output

    def _to_slots(self, tokens: Tokens, state: PrefillState, alive_rows: torch.Tensor) -> tuple[Tokens, PrefillState]:
        """The encoder's outcome in the projector's slot space (slot s = encoder position feature_start + s)."""
        start, width = self.adapter.feature_start, self.adapter.vision_tokens

        slot = torch.where(alive_rows, tokens.first, width)

        def to_slots(row_values: torch.Tensor) -> torch.Tensor:
            out = row_values.new_zeros(row_values.shape[0], width + 1).scatter(1, slot, row_values)
            return out[:, start:width]

        def mask_to_slots(mask: torch.Tensor) -> torch.Tensor:
            return to_slots(mask.gather(1, tokens.origin) & alive_rows)

        slots = self.slot_space.state(alive_rows.shape[0], mask_to_slots(state.valid))
        slots.protected = mask_to_slots(state.protected)
        slots.sets.update({name: mask_to_slots(mask) for name, mask in state.sets.items()})
        slots.scores.update({name: to_slots(score.gather(1, tokens.origin)) for name, score in state.scores.items()})
        if self.code_order:
            self._ranks = to_slots(torch.arange(slot.shape[1], device=slot.device).expand_as(slot))
        positions = slots.kept
        return Tokens(torch.empty(0), positions, positions, to_slots(tokens.size).clamp(min=1)), slots

    # ---------------------------------------------------------------- the projector
    def _on_projector_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        images = output.shape[0]
        projector: dict[str, object] = {}
        if self._reads_prompt:
            projector = {"encoder_features": self.adapter.projector_input_tokens(args[0]),
                         "question": lambda: self._prompt.question_words(images, output.shape[1])}  # type: ignore[union-attr]
        projector.update(self._samples([output.shape[1]] * images))
        if self._slots is None:
            state = self.slot_space.state(images)
            tokens = Tokens.start(output)
        else:
            tokens, state = self._slots
            tokens = replace(tokens, hidden=output)
        self._slots = None
        output, self.kept, self.protected = self._project(self.slot_space, tokens, state, projector, output)
        if self._ranks is not None:  # ToMe's code order: the kept tokens by their encoder row
            output, self.protected = in_rank_order(output, self.kept, self.protected, self._ranks)
            self._ranks = None
        return output

    def _samples(self, sizes: list[int], token_id: int | None = None) -> dict[str, object]:
        """The prompt row of each image, for `top(allocate=...)` and `vision[i]`: read from the stashed prompt when
        asked. `token_id`: the placeholder of a forward that encodes one kind (OneVision's images or videos)."""
        if not self._reads_samples:
            return {}
        ids = self.adapter.visual_ids if token_id is None else (token_id,)
        apart = tuple(i for i in self.adapter.visual_ids if i not in ids)
        return {"samples": lambda: image_samples(self._prompt.prompt, ids, sizes, apart)}  # type: ignore[union-attr]

    def _project(self, space: Space, tokens: Tokens, state: PrefillState, projector: dict[str, object],
                 output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the `projector.output` stages, in `space`, on the projected image tokens `output` [I, N, D]: the
        features with merges folded in, [I, N, D], and which slots reach the LLM and which a stage protected,
        [I, N] bool. Riders on `tokens` ([I, N, K]) fold alike and come back after D: [I, N, D + K]."""
        output = output if tokens.riders is None else torch.cat([output, tokens.riders], dim=-1)
        for stage in self.projector_output:
            evaluator = space.evaluator(state, stage, None, tokens.hidden, 0, **projector)
            tokens, alive, _, _ = run_statements(stage, evaluator, tokens)
            state.valid = alive & state.valid
        alive_rows = state.valid.gather(1, tokens.origin)
        output, kept = scatter_rows(tokens, alive_rows, output.shape[1], base=output)
        return output, kept, state.protected & kept

    def _on_image_tokens(self, tokens: list[torch.Tensor], image: list[torch.Tensor], token_id: int,
                         frames: list[torch.Tensor] | None = None,
                         spots: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Each image's (or video's) tokens as the LLM receives them ([n_i, D]; `image` [n_i] bool: image features,
        the rest separators such as LLaVA-NeXT's newlines) through the `projector.output` stages, one image per row
        padded to the widest. Only image features are `vision` (candidates); separators always reach the LLM.
        Videos give each token's frame and spatial index ([n_i] long, -1 on separators: `merge temporal`).
        `kept` / `protected` are flat over every image's tokens, in order, and kept per placeholder `token_id`
        (images and videos come in separate forwards)."""
        sizes = [len(t) for t in tokens]
        padded, valid = unpack(torch.cat(tokens), sizes)
        marks, _ = unpack(torch.cat(image)[:, None].float(), sizes)
        width = padded.shape[1]
        positions = torch.arange(width, device=padded.device)
        space = Space(positions >= 0, positions, positions < 0, None)  # no grid common to every image
        state = PrefillState(marks[..., 0].bool() & valid, valid, positions.expand(len(sizes), -1),
                             torch.zeros_like(valid))
        projector: dict[str, object] = self._samples(sizes, token_id)
        if frames is not None and spots is not None:  # for merge temporal; -1 on padding
            projector.update({name: torch.where(valid, unpack(torch.cat(values)[:, None], sizes)[0][..., 0], -1)
                              for name, values in (("frames", frames), ("spots", spots))})
        output, kept, protected = self._project(space, Tokens.start(padded), state, projector, padded)
        self.kept, self.protected = kept[valid], protected[valid]
        self.by_placeholder[token_id] = (self.kept, self.protected)
        return list(output[valid].split(sizes))

    def _on_packed_tower(self, module: nn.Module, args: tuple, kwargs: dict[str, object], output: object) -> object:
        """Dynamic resolution (Qwen2-VL): the tower's `pooler_output` [T, D] packs every image's merged tokens,
        image by image in raster order, `grid_thw` ([I, 3]) giving each image's patch grid. Images are padded to
        the widest for the stages, and `kept` / `protected` are flat [T] bool over the packed tokens. Qwen3-VL's
        `deepstack_features` ([T, D] per level) ride along: merges fold them alike (models/qwen3_vl.py says why)."""
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        packed = getattr(output, "pooler_output", None)
        if not isinstance(grid, torch.Tensor) or not isinstance(packed, torch.Tensor):
            raise PolicyError.at("the vision tower ran without grid_thw or returned no pooler_output", None)
        sizes = (grid.prod(-1) // self.adapter.encoder_patches_per_token).tolist()
        if sum(sizes) != packed.shape[0]:
            raise PolicyError.at(f"the vision tower returned {packed.shape[0]} tokens for grids giving {sum(sizes)}",
                                 None)
        padded, valid = unpack(packed, sizes)
        width = padded.shape[1]
        positions = torch.arange(width, device=padded.device)
        space = Space(positions >= 0, positions, positions < 0, None)  # no grid common to every image
        frames, spots = video_frames(grid, self.adapter.encoder_patches_per_token, valid)  # for merge temporal
        token_id = self.adapter.video_token_id if self._video_forward else self.adapter.image_token_id
        projector = {"frames": frames, "spots": spots, **self._samples(sizes, token_id)}
        levels = list(getattr(output, "deepstack_features", None) or [])  # Qwen3-VL: [T, D] per level
        riders = unpack(torch.cat(levels, dim=-1), sizes)[0] if levels and self.projector_output else None
        output_padded, kept, protected = self._project(space, Tokens.start(padded, riders),
                                                       space.state(len(sizes), valid), projector, padded)
        widths = [packed.shape[-1]] + [level.shape[-1] for level in levels if riders is not None]
        output.pooler_output, *folded = output_padded[valid].split(widths, dim=-1)  # type: ignore[attr-defined]
        if folded:  # Qwen3-VL: each kept token's DeepStack rows, folded as its features were
            output.deepstack_features = folded  # type: ignore[attr-defined]
        self.kept, self.protected = kept[valid], protected[valid]
        if token_id is not None:
            self.by_placeholder[token_id] = (self.kept, self.protected)
        return output

    def _mark_video_forward(self, video: bool) -> None:
        self._video_forward = video
