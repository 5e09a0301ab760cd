"""Scenes of simple shapes: sampling with known attributes, and anti-aliased rendering.

    python -c "import numpy as np; from metamorph.world.render import *; s = sample_scene(np.random.default_rng(0), image_size=32); print(s); render(s).save('/tmp/scene.png')"

A scene is a background colour plus objects, each with a shape, colour, size class and an exact
centre/extent in output pixels. Still scenes place objects in distinct cells of a 3x3 grid (so
"position" is exact and objects never overlap); video frames place them anywhere. Rendering
samples every pixel at ``supersample`` x ``supersample`` sub-pixel points and averages them (the
same as drawing at ``supersample`` times the resolution and box-filtering down): edge pixels get
their true coverage instead of jaggies, and the result does not depend on a rasteriser's rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np
from PIL import Image

from metamorph.world import attributes as A


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str  # "small" | "large"
    cx: float  # centre in output pixels (x right, y down; pixel i spans [i, i+1))
    cy: float
    extent: float  # side of the square box the shape fills, in output pixels

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """Exact xyxy box of the shape in output pixels (every shape fills its extent box)."""
        h = self.extent / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def position(self, image_size: int) -> str:
        """The 3x3 grid cell holding the centre."""
        cell = image_size / A.GRID
        col = min(A.GRID - 1, max(0, int(self.cx // cell)))
        row = min(A.GRID - 1, max(0, int(self.cy // cell)))
        return A.position_name(row, col)

    def phrase(self, image_size: int, with_position: bool = True) -> str:
        """"a large red circle in the top left" (or without the position)."""
        s = f"{A.article(self.size)} {self.size} {self.colour} {self.shape}"
        return f"{s} in the {self.position(image_size)}" if with_position else s


@dataclass(frozen=True)
class Scene:
    image_size: int
    background: str
    objects: tuple[Obj, ...] = field(default_factory=tuple)

    def find(self, shape: str) -> Obj:
        return next(o for o in self.objects if o.shape == shape)

    def to_meta(self) -> dict[str, Any]:
        """Exact ground truth for evaluation (JSON-serialisable; coordinates to 1/1000 px)."""
        return {
            "image_size": self.image_size,
            "background": self.background,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "position": o.position(self.image_size),
                    "cx": round(o.cx, 3),
                    "cy": round(o.cy, 3),
                    "extent": round(o.extent, 3),
                }
                for o in self.objects
            ],
        }


def pick(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    """One element of seq (keeps Python types, unlike ``rng.choice`` on strings)."""
    return seq[int(rng.integers(len(seq)))]


def sample(rng: np.random.Generator, seq: Sequence[Any], k: int) -> list[Any]:
    """k distinct elements of seq in random order."""
    return [seq[int(i)] for i in rng.permutation(len(seq))[:k]]


def extent_for(size: str, image_size: int, small_frac: float, large_frac: float) -> float:
    cell = image_size / A.GRID
    return cell * (large_frac if size == "large" else small_frac)


def place_in_cell(
    rng: np.random.Generator, row: int, col: int, extent: float, image_size: int, jitter: float
) -> tuple[float, float]:
    """A centre inside cell (row, col) such that the extent box stays inside the cell."""
    cell = image_size / A.GRID
    margin = max(0.0, (cell - extent) / 2) * jitter
    cx = (col + 0.5) * cell + float(rng.uniform(-margin, margin))
    cy = (row + 0.5) * cell + float(rng.uniform(-margin, margin))
    return cx, cy


def sample_scene(
    rng: np.random.Generator,
    *,
    image_size: int,
    n_objects: int | None = None,
    min_objects: int = 1,
    max_objects: int = 3,
    small_frac: float = 0.5,
    large_frac: float = 0.85,
    jitter: float = 1.0,
    sizes: Sequence[str] | None = None,
) -> Scene:
    """A random still scene: unique shapes, distinct grid cells, any colours (repeats allowed).

    ``sizes`` fixes the size class of each object (its length sets the object count)."""
    if sizes is not None:
        n_objects = len(sizes)
    elif n_objects is None:
        n_objects = int(rng.integers(min_objects, max_objects + 1))
    shapes = sample(rng, A.SHAPES, n_objects)
    cells = sample(rng, range(A.GRID * A.GRID), n_objects)
    colours = list(A.COLOURS)
    objs = []
    for i, (shape, cell) in enumerate(zip(shapes, cells)):
        size = sizes[i] if sizes is not None else pick(rng, A.SIZES)
        extent = extent_for(size, image_size, small_frac, large_frac)
        row, col = divmod(cell, A.GRID)
        cx, cy = place_in_cell(rng, row, col, extent, image_size, jitter)
        objs.append(Obj(shape=shape, colour=pick(rng, colours), size=size, cx=cx, cy=cy, extent=extent))
    return Scene(image_size=image_size, background=pick(rng, list(A.BACKGROUNDS)), objects=tuple(objs))


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """Point-in-shape test for offsets (dx, dy) from the centre of an extent box of half-side h."""
    ax, ay = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (ax <= h) & (ay <= h)
    if shape == "diamond":
        return ax + ay <= h
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (ay <= h) & (ax <= (dy + h) / 2)
    if shape == "cross":  # a plus sign, arms one third of the extent wide
        a = h / 3
        return ((ax <= a) & (ay <= h)) | ((ay <= a) & (ax <= h))
    raise ValueError(f"unknown shape {shape!r}; known: {A.SHAPES}")


def render(scene: Scene, supersample: int = 4) -> Image.Image:
    """RGB image of the scene, anti-aliased: each pixel's coverage by a shape is the fraction of
    its ``supersample`` x ``supersample`` sub-pixel centres inside the shape (an exact box filter
    of the supersampled image), and the object colour is blended in by that coverage."""
    n, ss = scene.image_size, supersample
    img_HW3 = np.empty((n, n, 3), np.float32)
    img_HW3[:] = A.BACKGROUNDS[scene.background]
    for o in scene.objects:  # later objects are drawn on top (only video paths can overlap)
        x0, y0, x1, y1 = o.bbox
        px0, py0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        px1, py1 = min(n, math.ceil(x1)), min(n, math.ceil(y1))
        if px1 <= px0 or py1 <= py0:
            continue
        # only the pixels under the object's box are evaluated: ~100 px per object at 32 px
        xs = (np.arange(px0 * ss, px1 * ss) + 0.5) / ss - o.cx
        ys = (np.arange(py0 * ss, py1 * ss) + 0.5) / ss - o.cy
        inside = _inside(o.shape, xs[None, :], ys[:, None], o.extent / 2)
        cov_hw = inside.reshape(py1 - py0, ss, px1 - px0, ss).mean(axis=(1, 3), dtype=np.float32)
        region = img_HW3[py0:py1, px0:px1]
        region += (np.asarray(A.COLOURS[o.colour], np.float32) - region) * cov_hw[..., None]
    return Image.fromarray(np.rint(img_HW3).astype(np.uint8), "RGB")


def pixel_bbox(o: Obj, image_size: int, pad: float = 0.0) -> list[int]:
    """Integer xyxy pixel box covering the object plus ``pad * extent`` per side, clipped to the
    image. x2/y2 are exclusive edges (the box spans pixels x1..x2-1), as in PIL's crop()."""
    x0, y0, x1, y1 = o.bbox
    m = pad * o.extent
    return [
        max(0, math.floor(x0 - m)),
        max(0, math.floor(y0 - m)),
        min(image_size, math.ceil(x1 + m)),
        min(image_size, math.ceil(y1 + m)),
    ]


def with_object(scene: Scene, i: int, **changes: Any) -> Scene:
    objs = list(scene.objects)
    objs[i] = replace(objs[i], **changes)
    return replace(scene, objects=tuple(objs))


def scene_from_meta(meta: dict[str, Any]) -> Scene:
    """Inverse of ``Scene.to_meta`` (up to the rounding of coordinates): re-render a record's truth."""
    objs = tuple(
        Obj(shape=o["shape"], colour=o["colour"], size=o["size"], cx=o["cx"], cy=o["cy"], extent=o["extent"])
        for o in meta["objects"]
    )
    return Scene(image_size=meta["image_size"], background=meta["background"], objects=objs)


__all__ = [
    "Obj",
    "Scene",
    "extent_for",
    "pick",
    "pixel_bbox",
    "place_in_cell",
    "render",
    "sample",
    "sample_scene",
    "scene_from_meta",
    "with_object",
]
