"""The toy world's attribute vocabularies: the single definition every generator and evaluator uses.

    python -c "from metamorph.world import attributes as a; print(a.SHAPES, a.COLOURS, a.POSITIONS)"

Words here are the canonical answers (lowercase, no punctuation), so exact-match evaluation is a
string comparison. Object colours and background colours are disjoint sets, so an object never
vanishes into its background and "what colour is X" never has two readings.
"""

from __future__ import annotations

# Shapes every renderer knows. All fill the same square extent box (see render.py), so the bbox of
# an object is its extent box whatever its shape.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

# Object colours (sRGB). Chosen far apart in RGB (pairwise Euclidean distance >= 100) so they survive JPEG,
# yuv420p video chroma subsampling and anti-aliased edges.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (245, 225, 20),
    "purple": (140, 50, 180),
    "orange": (240, 125, 10),
}

# Background colours; disjoint from COLOURS.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}

SIZES: tuple[str, ...] = ("small", "large")

# The coarse 3x3 grid, row-major; POSITIONS[row * 3 + col].
POSITIONS: tuple[str, ...] = (
    "top left",
    "top center",
    "top right",
    "middle left",
    "center",
    "middle right",
    "bottom left",
    "bottom center",
    "bottom right",
)
GRID = 3

# Directions of motion in video clips: name -> unit step (dx, dy) in image coordinates (y down).
DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (1, 0),
    "left": (-1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# Something-Something v2 templates for each direction (these four are real SSv2 classes).
SSV2_TEMPLATES: dict[str, str] = {
    "right": "Moving [something] from left to right",
    "left": "Moving [something] from right to left",
    "up": "Moving [something] up",
    "down": "Moving [something] down",
}

# Image-edit operations the world can produce (InstructPix2Pix family).
EDIT_TYPES: tuple[str, ...] = ("recolour", "move", "resize", "remove", "add", "background")

# ImageQA question types (understanding family).
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position", "size")

MC_LETTERS = "ABCD"


def position_name(row: int, col: int) -> str:
    return POSITIONS[row * GRID + col]


def position_cell(name: str) -> tuple[int, int]:
    """(row, col) of a position name."""
    i = POSITIONS.index(name)
    return divmod(i, GRID)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
