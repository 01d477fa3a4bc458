"""Hook points: where a stage runs, and position modes for kept tokens."""

from dataclasses import dataclass

from policyc.catalog.base import Registry, Spec, StageKind


@dataclass(frozen=True)
class HookSpec(Spec):
    stage_kind: StageKind = "llm"
    layered: bool = False  # takes a layer selection `[...]`
    order: int = 0  # execution order of hook points

    def signature(self) -> str:
        """How a policy writes the hook: `llm.layer[k]`, `encoder.layer[i].attention`."""
        return self.name.replace("layer", "layer[k]" if self.stage_kind == "llm" else "layer[i]", 1) \
            if self.layered else self.name


HOOKS = Registry("hook", "hook point")
HOOKS.add(
    HookSpec("encoder.layer.attention", "hook", "inside encoder layer i, after attention and before the MLP "
             "(where ToMe merges)", stage_kind="encoder", layered=True, order=0),
    HookSpec("encoder.layer", "hook", "after encoder layer i; negative indices count from the end "
             "(encoder.layer[-2] is LLaVA's feature layer)", stage_kind="encoder", layered=True, order=0),
    HookSpec("encoder.output", "hook", "the encoder features handed to the projector", stage_kind="encoder",
             order=1),
    HookSpec("projector.output", "hook", "the image features in the LLM's embedding space, before the LLM",
             stage_kind="projector", order=2),
    HookSpec("llm.layer", "hook", "after decoder layer k during prefill", stage_kind="llm", layered=True, order=3),
    HookSpec("decode", "hook", "the KV cache during decoding", stage_kind="decode", order=4),
)

POSITIONS = Registry("positions", "position mode", plural="positions")
POSITIONS.add(
    Spec("original", "positions", "kept tokens keep their original position ids (FastV, SparseVLM v2)"),
    Spec("compact", "positions", "kept tokens are renumbered contiguously; decode positions shift to match "
         "(PyramidDrop, VisionDrop)"),
    Spec("cache_length", "positions", "renumbered contiguously; decode positions follow each layer's cache "
         "length (MustDrop, SparseVLM v1)"),
)
