"""Synthetic visual question answering: seeded scenes of coloured shapes and one-word questions about them.

A scene places 2 to 5 shapes (circle, square, triangle; 6 colours; small or large) in distinct cells of a
3 x 3 layout on a light background, jittered inside their cell. Questions ask for a shape's colour, the
shape in a cell, a count, whether a shape exists, or whether one shape is left of another; every answer
is one word, and every question has exactly one correct answer. Small shapes cover about 2 x 2 patches of
an 8-pixel patch grid, so the answers depend on small regions: dropping the wrong tokens loses them.

Everything is a function of (split, index): the same sample on every machine, splits disjoint by seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 160, 60), "blue": (45, 80, 215),
    "yellow": (225, 195, 30), "purple": (135, 55, 175), "orange": (240, 125, 25),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 6, "large": 11}  # half-width in pixels at image size 96
CELLS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four", "five")
KINDS = ("color", "shape", "count", "exists", "left")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
IMAGE_SIZE = 96


@dataclass(frozen=True)
class Shape:
    kind: str  # one of SHAPES
    color: str  # one of COLORS
    size: str  # one of SIZES
    cell: int  # index into CELLS (row-major 3 x 3)
    x: int  # centre, pixels
    y: int

    @property
    def column(self) -> int:
        return self.cell % 3


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: tuple[int, int, int]
    size: int = IMAGE_SIZE

    def render(self) -> Image.Image:
        """The scene as an RGB image of `size` x `size` pixels."""
        image = Image.new("RGB", (self.size, self.size), self.background)
        draw = ImageDraw.Draw(image)
        for shape in self.shapes:
            _draw(draw, shape, self.size / IMAGE_SIZE, COLORS[shape.color])
        return image

    def patch_labels(self, patch: int = 8, cover: float = 0.2) -> dict[str, list[int]]:
        """Per-patch targets for pretraining a vision tower on this scene, one entry per patch of the
        (size / patch)^2 grid in row-major order: `color` (0 background, 1 + index into COLORS) and `kind`
        (0 none, 1 + index into SHAPES) of the shape covering most of the patch (at least `cover` of it),
        `centre` (1 where a shape's centre lies), and `cell` (the 3 x 3 layout cell the patch lies in)."""
        grid = self.size // patch
        best = [(cover, None)] * grid**2
        scale = self.size / IMAGE_SIZE
        for shape in self.shapes:
            mask = Image.new("L", (self.size, self.size), 0)
            _draw(ImageDraw.Draw(mask), shape, scale, 255)
            shares = mask.resize((grid, grid), Image.Resampling.BOX).tobytes()  # one byte per patch
            best = [(share / 255, shape) if share / 255 >= top else (top, old)
                    for share, (top, old) in zip(shares, best, strict=True)]
        colors, kinds = list(COLORS), list(SHAPES)
        centres = {int(s.y * scale) // patch * grid + int(s.x * scale) // patch for s in self.shapes}
        return {"color": [0 if s is None else 1 + colors.index(s.color) for _, s in best],
                "kind": [0 if s is None else 1 + kinds.index(s.kind) for _, s in best],
                "centre": [int(i in centres) for i in range(grid**2)],
                "cell": [(i // grid * 3 // grid) * 3 + (i % grid) * 3 // grid for i in range(grid**2)]}


def _draw(draw: ImageDraw.ImageDraw, shape: Shape, scale: float, fill: Any) -> None:
    r = SIZES[shape.size] * scale
    x, y = shape.x * scale, shape.y * scale
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)


@dataclass(frozen=True)
class Sample:
    scene: Scene
    question: str
    answer: str
    kind: str  # one of KINDS


def make_scene(rng: random.Random, size: int = IMAGE_SIZE) -> Scene:
    cells = rng.sample(range(9), rng.randint(2, 5))
    shapes = []
    for cell in cells:
        kind, color, big = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.random() < 0.5
        half = SIZES["large" if big else "small"]
        span = IMAGE_SIZE // 3
        slack = span // 2 - half - 2
        x = (cell % 3) * span + span // 2 + rng.randint(-slack, slack)
        y = (cell // 3) * span + span // 2 + rng.randint(-slack, slack)
        shapes.append(Shape(kind, color, "large" if big else "small", cell, x, y))
    shade = rng.randint(225, 250)
    return Scene(tuple(shapes), (shade, shade, shade), size)


def _unique(shapes: tuple[Shape, ...], key: str) -> list[Shape]:
    """Shapes no other shape of the scene shares `key` with (the kind, or the colour and kind)."""
    def of(s: Shape) -> tuple[str, ...]:
        return (s.kind,) if key == "kind" else (s.color, s.kind)
    return [s for s in shapes if sum(of(t) == of(s) for t in shapes) == 1]


def ask(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A question of `kind` about `scene` and its answer, or None when the scene allows none."""
    shapes = scene.shapes
    if kind == "color":
        unique = _unique(shapes, "kind")
        if not unique:
            return None
        shape = rng.choice(unique)
        return f"what color is the {shape.kind} ?", shape.color
    if kind == "shape":
        shape = rng.choice(shapes)
        return f"what shape is at the {CELLS[shape.cell]} ?", shape.kind
    if kind == "count":
        target = rng.choice(SHAPES)
        return f"how many {target}s are there ?", NUMBERS[sum(s.kind == target for s in shapes)]
    if kind == "exists":
        present = {(s.color, s.kind) for s in shapes}
        if rng.random() < 0.5:
            color, shape_kind = rng.choice(sorted(present))
        else:
            absent = [(c, k) for c in COLORS for k in SHAPES if (c, k) not in present]
            color, shape_kind = rng.choice(absent)
        return f"is there a {color} {shape_kind} ?", "yes" if (color, shape_kind) in present else "no"
    unique = _unique(shapes, "color")
    pairs = [(a, b) for a in unique for b in unique if a is not b and a.column != b.column]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    answer = "yes" if a.column < b.column else "no"
    return f"is the {a.color} {a.kind} left of the {b.color} {b.kind} ?", answer


def sample(split: str, index: int, size: int = IMAGE_SIZE) -> Sample:
    """The `index`-th sample of `split` (train, validation or test): the same everywhere."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split '{split}': one of {', '.join(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[split] * 1_000_003 + index)
    kind = KINDS[index % len(KINDS)]
    while True:
        scene = make_scene(rng, size)
        asked = ask(scene, kind, rng)
        if asked is not None:
            return Sample(scene, asked[0], asked[1], kind)


def scene_questions(split: str, index: int, count: int = len(KINDS)) -> tuple[Scene, list[tuple[str, str]]]:
    """The `index`-th training scene of `split` with up to `count` (question, answer) pairs, one per kind
    (starting at kind `index % 5`, skipping kinds the scene allows none of): for training, where each
    image serves several questions. Seeded apart from `sample` (another stream of the same split)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split '{split}': one of {', '.join(SPLIT_SEEDS)}")
    rng = random.Random(-(SPLIT_SEEDS[split] * 1_000_003 + index) - 1)
    scene = make_scene(rng)
    asked = [ask(scene, KINDS[(index + k) % len(KINDS)], rng) for k in range(len(KINDS))]
    return scene, [qa for qa in asked if qa is not None][:count]


def samples(split: str, count: int, start: int = 0, size: int = IMAGE_SIZE) -> Iterator[Sample]:
    for index in range(start, start + count):
        yield sample(split, index, size)


def vocabulary() -> list[str]:
    """Every word a question or answer uses."""
    words = {"what", "color", "is", "the", "shape", "at", "how", "many", "are", "there", "a", "left", "of", "?",
             "yes", "no", *COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), *NUMBERS}
    for cell in CELLS:
        words.update(cell.split())
    return sorted(words)
