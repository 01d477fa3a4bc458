"""`--show-tokens`: draw, per stage, the input image with the patches whose tokens were kept, dropped
or merged (one panel per stage and layer, from `policyc.report.StageTokens`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from policyc.report import StageTokens

DROPPED = (0.0, 0.0, 0.0, 0.72)  # RGBA over a dropped patch
MERGED = (0.15, 0.35, 0.95, 0.55)  # RGBA over a patch merged into another


def cell_shades(cells: int, stage: StageTokens) -> list[tuple[float, float, float, float] | None]:
    """The shade over each of the first `cells` patches (row-major) of a panel: DROPPED where its token did not
    survive `stage`, MERGED where it was merged into another, None where it was kept. Tokens past `cells` (a
    later image, crops or tiles the panel does not show) are not drawn."""
    kept = set(stage.kept_patches)
    return [MERGED if patch in stage.merged else None if patch in kept else DROPPED for patch in range(cells)]


def draw_kept_tokens(path: str | Path, picture: Any, grid: tuple[int, int], stages: Sequence[StageTokens],
                     title: str = "") -> Path:
    """Write a PNG: the image (`picture`, [H, W, 3] in [0, 1]) once as given, then once per entry of
    `stages` with dropped patches darkened and merged ones tinted. `grid` is (rows, columns) of patches: the first
    rows x columns image tokens of the prompt, row-major (the adapter's `first_image` says which picture they tile)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows, cols = grid
    height, width = picture.shape[:2]
    cell_h, cell_w = height / rows, width / cols
    panels = len(stages) + 1
    per_row = min(panels, 4)
    lines = (panels + per_row - 1) // per_row
    figure, axes = plt.subplots(lines, per_row, figsize=(3 * per_row, 3.3 * lines), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title(f"input ({rows * cols} patches)", fontsize=9)
    for axis, stage in zip(list(axes.flat)[1:], stages, strict=False):
        axis.imshow(picture)
        for r in range(1, rows):
            axis.axhline(r * cell_h - 0.5, color="white", linewidth=0.3, alpha=0.5)
        for c in range(1, cols):
            axis.axvline(c * cell_w - 0.5, color="white", linewidth=0.3, alpha=0.5)
        for patch, color in enumerate(cell_shades(rows * cols, stage)):
            if color is not None:
                r, c = divmod(patch, cols)
                axis.add_patch(Rectangle((c * cell_w - 0.5, r * cell_h - 0.5), cell_w, cell_h, color=color,
                                         linewidth=0))
        where = stage.point + ("" if stage.layer is None else f"[{stage.layer}]")
        axis.set_title(f"{stage.label}\n{where}: kept {stage.after} of {stage.before}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


__all__ = ["DROPPED", "MERGED", "cell_shades", "draw_kept_tokens"]
