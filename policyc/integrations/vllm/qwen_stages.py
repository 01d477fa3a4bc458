"""policyc's pre-LLM stages on Qwen2-VL / Qwen2.5-VL for vLLM: the transformers tower they run on, the tokens each
image keeps (per image grid: dynamic resolution), and the M-RoPE positions of a prompt whose images keep some tokens.

A transformers `Qwen2VLForConditionalGeneration` (or 2.5's) holds the served tower and patch merger (`qwen_shell`)
with a one-layer stand-in LLM that never runs; policyc compiles onto it as on transformers, so its stages run through
the same code (`QwenPreLLM`). `qwen_kept_count` measures a deployment's count for one grid on a miniature with random
weights and three probe images, as `kept_count` does for LLaVA (stages.py), and refuses counts that depend on the
image.

Positions (`kept_mrope_positions`) follow policyc's rule on M-RoPE (policyc/models/qwen2_vl.py): a kept image token
keeps its (t, h, w) coordinates in the unpruned grid, and the text after an image starts where the unpruned layout
starts it (one past the grid's largest coordinate), exactly as transformers computes positions before policyc drops
the image tokens at the LLM's input.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from policyc.integrations.vllm.deployment import Deployment
from policyc.integrations.vllm.shell import PROBE_SEED, PROBE_WIDTH, _stand_in_text
from policyc.integrations.vllm.stages import PreLLM, _refuse_out_of_range, one_count

MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
PROBE_GRID = (16, 16)  # patches per side of the image a deployment is checked on before any image arrives


def _model_class(config: Any) -> type[nn.Module]:
    import transformers

    if config.model_type == "qwen2_5_vl":
        return transformers.Qwen2_5_VLForConditionalGeneration
    return transformers.Qwen2VLForConditionalGeneration


def _stand_in(config: Any, hidden_size: int, layers: int = 1) -> None:
    """`_stand_in_text` with Qwen's per-layer attention types (every layer full)."""
    _stand_in_text(config, hidden_size, layers)
    config.text_config.layer_types = ["full_attention"] * layers


def qwen_shell(config: Any) -> nn.Module:
    """A transformers Qwen2-VL / 2.5-VL with `config`'s vision tower and merger (weights to be loaded) and a
    one-layer stand-in LLM, in eval mode, in the current default dtype and device."""
    config = copy.deepcopy(config)
    _stand_in(config, config.text_config.hidden_size)
    config.vision_config._attn_implementation = "sdpa"
    return _model_class(config)(config).eval()


def qwen_probe_shell(config: Any) -> nn.Module:
    """A miniature of `config`'s geometry (patch, merge and temporal sizes, encoder depth, 2.5's windows) with narrow
    random layers (seeded; its LLM as deep, for LLM stages to bind and be refused), float32 on the CPU."""
    config = copy.deepcopy(config)
    vision = config.vision_config
    vision.embed_dim = vision.hidden_size = vision.intermediate_size = vision.out_hidden_size = PROBE_WIDTH
    vision.num_heads = 2
    _stand_in(config, PROBE_WIDTH, config.text_config.num_hidden_layers)
    with torch.random.fork_rng(), torch.device("cpu"):
        torch.manual_seed(PROBE_SEED)
        return _model_class(config)(config).to(torch.float32).eval()


def probe_pixels(config: Any, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Three images of `grid` (patches per side), as the Qwen processor packs them: pixel rows [3 * h * w, C * t *
    p * p] (a constant image and two random ones, seeded) and their `image_grid_thw` [3, 3]."""
    vision = config.vision_config
    rows, cols = grid
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(3, rows * cols, width, generator=torch.Generator().manual_seed(PROBE_SEED))
    pixels[0] = 0.0
    return pixels.reshape(-1, width), torch.tensor([[1, rows, cols]] * 3)


class QwenPreLLM(PreLLM):
    """A deployment's stages compiled onto a transformers Qwen2-VL `shell` (its tower and merger run them)."""

    @torch.inference_mode()
    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[list[torch.Tensor],
                                                                                    list[torch.Tensor]]:
        """Images' packed pixel rows [P, C * t * p * p] and grids [I, 3] -> per image, its kept tokens' LLM
        embeddings [K_i, D] in raster order and the kept slots (indices into its unpruned merged tokens) [K_i]."""
        output = self.shell.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)
        features = list(output.pooler_output)
        kept = self.compiled.images.kept
        if kept is None:  # no stage before the LLM dropped anything
            return features, [torch.arange(len(f), device=f.device) for f in features]
        masks = kept.split([len(f) for f in features])
        return [f[k] for f, k in zip(features, masks, strict=True)], [k.nonzero()[:, 0] for k in masks]


_COUNTS: dict[tuple[str, str, tuple[int, int]], int] = {}


def qwen_kept_count(config: Any, deployment: Deployment, grid: tuple[int, int]) -> int:
    """The merged tokens an image of `grid` patches (rows, cols) keeps under `deployment` on a Qwen2-VL of
    `config` (cached per geometry and grid)."""
    key = (config.vision_config.to_json_string(), deployment.key, grid)
    if key not in _COUNTS:
        stages = QwenPreLLM(qwen_probe_shell(config), deployment)
        _refuse_out_of_range(stages, deployment)  # type: ignore[arg-type]  # it reads .compiled and .plan alone
        counts = sorted({len(k) for k in stages(*probe_pixels(config, grid))[1]})
        stages.compiled.remove()
        _COUNTS[key] = one_count(stages, counts, f"a {grid[0]}x{grid[1]}-patch image")
    return _COUNTS[key]


def kept_mrope_positions(length: int, images: Sequence[tuple[int, int, int, torch.Tensor]]) -> tuple[torch.Tensor,
                                                                                                       int]:
    """M-RoPE positions [3, length] of a prompt of `length` tokens whose images are `(offset, rows, cols, kept)`
    (placeholder offset, merged grid, kept slots [K] ascending, K placeholders), by offset; and the delta of the
    positions after the prompt (max + 1 - length). Kept tokens keep their unpruned (0, h, w) coordinates; text
    after an image starts one past the image's largest coordinate, as without the policy."""
    pieces, start, cursor = [], 0, 0
    for offset, rows, cols, kept in sorted(images, key=lambda image: image[0]):
        text = offset - cursor
        pieces.append(torch.arange(text).expand(3, -1) + start)
        start += text
        grid = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(rows), torch.arange(cols),
                                          indexing="ij")).reshape(3, -1)
        pieces.append(grid[:, kept.cpu()] + start)
        start += max(rows, cols)
        cursor = offset + len(kept)
    pieces.append(torch.arange(length - cursor).expand(3, -1) + start)
    positions = torch.cat(pieces, dim=1)
    return positions, int(positions.max()) + 1 - length if length else 0


__all__ = ["MODEL_TYPES", "PROBE_GRID", "QwenPreLLM", "kept_mrope_positions", "probe_pixels", "qwen_kept_count",
           "qwen_probe_shell", "qwen_shell"]
