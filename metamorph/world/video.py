"""Video clips of one object moving in a straight line, and their mp4 encoding with PyAV.

    python -c "import numpy as np; from metamorph.world.video import *; c = sample_clip(np.random.default_rng(0), image_size=32, n_frames=8); open('/tmp/clip.mp4','wb').write(encode_mp4(render_clip(c), fps=8)); print(c.direction, c.speed)"

A clip is a background, optional static distractors in grid cells, and a mover whose centre
advances ``speed`` px per frame in one of four directions (DIRECTIONS in attributes.py). Frames
are rendered with the still-scene renderer, so sub-pixel motion is anti-aliased and smooth.

Encoding: H.264 (libx264) by default, yuv420p, one thread, constant quantiser and fixed options so
the bytes are a function of the frames alone (the mp4 muxer writes no wall-clock time unless
asked). ``mpeg4`` is the fallback for PyAV builds without libx264.
"""

from __future__ import annotations

import io
from fractions import Fraction
from dataclasses import dataclass, replace
from typing import Any

import av
import numpy as np
from PIL import Image

from metamorph.world import attributes as A
from metamorph.world.render import Obj, Scene, extent_for, pick, place_in_cell, render, sample


@dataclass(frozen=True)
class Clip:
    scene: Scene  # the first frame: distractors plus the mover (last object) at its start
    direction: str  # key of attributes.DIRECTIONS
    speed: float  # px per frame along the direction
    n_frames: int

    @property
    def mover(self) -> Obj:
        return self.scene.objects[-1]

    def centres(self) -> list[tuple[float, float]]:
        dx, dy = A.DIRECTIONS[self.direction]
        m = self.mover
        return [(m.cx + dx * self.speed * t, m.cy + dy * self.speed * t) for t in range(self.n_frames)]

    def frame_scene(self, t: int) -> Scene:
        cx, cy = self.centres()[t]
        objs = self.scene.objects[:-1] + (replace(self.mover, cx=cx, cy=cy),)
        return replace(self.scene, objects=objs)

    def to_meta(self) -> dict[str, Any]:
        n = self.scene.image_size
        last = self.frame_scene(self.n_frames - 1).objects[-1]
        return {
            "image_size": n,
            "background": self.scene.background,
            "mover": {
                "shape": self.mover.shape,
                "colour": self.mover.colour,
                "size": self.mover.size,
                "extent": round(self.mover.extent, 3),
                "start": [round(self.mover.cx, 3), round(self.mover.cy, 3)],
                "end": [round(last.cx, 3), round(last.cy, 3)],
                "start_position": self.mover.position(n),
                "end_position": last.position(n),
            },
            "direction": self.direction,
            "speed_px_per_frame": round(self.speed, 4),
            "n_frames": self.n_frames,
            "distractors": Scene(image_size=n, background=self.scene.background,
                                 objects=self.scene.objects[:-1]).to_meta()["objects"],
        }


def sample_clip(
    rng: np.random.Generator,
    *,
    image_size: int,
    n_frames: int,
    max_distractors: int = 0,
    min_travel: float = 0.35,
    max_travel: float = 0.6,
    small_frac: float = 0.5,
    large_frac: float = 0.85,
    jitter: float = 1.0,
    on_grid: bool = False,
) -> Clip:
    """A random clip; the mover stays fully inside the frame for every frame. ``on_grid``: the mover
    starts and ends on grid-cell centres (see below); else it starts anywhere."""
    n = image_size
    n_distractors = int(rng.integers(0, max_distractors + 1))
    shapes = sample(rng, A.SHAPES, n_distractors + 1)
    background = pick(rng, list(A.BACKGROUNDS))
    distractors, taken = [], set()
    for shape, cell in zip(shapes[:-1], sample(rng, range(A.GRID * A.GRID), n_distractors)):
        taken.add(divmod(cell, A.GRID))
        size = pick(rng, A.SIZES)
        extent = extent_for(size, n, small_frac, large_frac)
        cx, cy = place_in_cell(rng, *divmod(cell, A.GRID), extent, n, jitter)
        distractors.append(Obj(shape=shape, colour=pick(rng, list(A.COLOURS)), size=size, cx=cx, cy=cy, extent=extent))
    size = pick(rng, A.SIZES)
    extent = extent_for(size, n, small_frac, large_frac)
    direction = pick(rng, list(A.DIRECTIONS))
    dx, dy = A.DIRECTIONS[direction]
    if on_grid:
        # as centred still scenes (world.jitter 0): the mover starts at a cell centre and ends at
        # the centre of the cell 1 or 2 steps away (min/max_travel unused), off any distractor's
        # cell, so the first and last frames look like still scenes (one cell = one patch of a
        # grid-aligned encoder)
        cell = n / A.GRID
        paths = [(r, c, k) for k in (1, 2) for r in range(A.GRID) for c in range(A.GRID)
                 if 0 <= r + dy * k < A.GRID and 0 <= c + dx * k < A.GRID
                 and not taken & {(r + dy * j, c + dx * j) for j in range(k + 1)}]
        r, c, k = paths[int(rng.integers(len(paths)))]
        cx, cy, travel = (c + 0.5) * cell, (r + 0.5) * cell, k * cell
    else:
        travel = float(rng.uniform(min_travel, max_travel)) * n
        travel = min(travel, n - extent)  # a large object at high travel must still fit
        h = extent / 2
        along = float(rng.uniform(h, n - h - travel))  # start coordinate along the motion axis
        across = float(rng.uniform(h, n - h))
        if dx:
            cx, cy = (along if dx > 0 else n - along), across
        else:
            cx, cy = across, (along if dy > 0 else n - along)
    mover = Obj(shape=shapes[-1], colour=pick(rng, list(A.COLOURS)), size=size, cx=cx, cy=cy, extent=extent)
    scene = Scene(image_size=n, background=background, objects=tuple(distractors) + (mover,))
    return Clip(scene=scene, direction=direction, speed=travel / (n_frames - 1), n_frames=n_frames)


def render_clip(clip: Clip, supersample: int = 4) -> list[Image.Image]:
    return [render(clip.frame_scene(t), supersample) for t in range(clip.n_frames)]


def encode_mp4(frames: list[Image.Image], fps: int, codec: str = "libx264", quality: int = 12) -> bytes:
    """mp4 bytes of RGB frames (equal, even sizes). ``quality``: the libx264 constant QP (0..51;
    lower is better). mpeg4 ignores it: its default rate control (200 kb/s) is already near the
    render at these sizes (~3 levels mean abs error)."""
    w, h = frames[0].size
    if codec not in ("libx264", "mpeg4"):
        raise ValueError(f"video codec {codec!r}: use 'libx264' or 'mpeg4'")
    time_base = Fraction(1, fps)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        if codec == "libx264":
            # Constant QP, not CRF: x264's CRF rate control does float maths that gave different
            # bytes for the same frames once swscale (any PyAV yuv->rgb conversion) had run in the
            # process; constant-QP output is bit-stable. A fixed preset pins every other setting.
            stream = container.add_stream(codec, rate=fps, options={"qp": str(quality), "preset": "medium"})
        else:
            stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = w, h
        stream.time_base = time_base
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # multi-threaded encoding is not bit-reproducible
        for t, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb_to_yuv420p(np.asarray(img.convert("RGB"))), format="yuv420p")
            frame.pts = t
            frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):  # flush the encoder's delayed frames
            container.mux(packet)
    return buf.getvalue()


def rgb_to_yuv420p(rgb_HW3: np.ndarray) -> np.ndarray:
    """BT.601 limited-range YUV 4:2:0 planes stacked as PyAV's ``yuv420p`` ndarray (H*3/2 x W).

    Done here rather than by the encoder's implicit swscale conversion: in PyAV 18 that reused
    conversion context gave different bytes for the same frames after other conversions had run
    in the process, which broke same-seed -> same-bytes. The decoders' default yuv->rgb (BT.601)
    inverts this to within ~2 levels."""
    h, w, _ = rgb_HW3.shape
    rgb = rgb_HW3.astype(np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + (65.481 * r + 128.553 * g + 24.966 * b) / 255
    cb = 128 + (-37.797 * r - 74.203 * g + 112.0 * b) / 255
    cr = 128 + (112.0 * r - 93.786 * g - 18.214 * b) / 255

    def half(c: np.ndarray) -> np.ndarray:  # 2x2 box average: the chroma sample sits mid-block
        return c.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    flat = np.concatenate([y.ravel(), half(cb).ravel(), half(cr).ravel()])
    return np.clip(np.rint(flat), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def decode_mp4(data: bytes | str) -> list[np.ndarray]:
    """RGB frames (HxWx3 uint8) of an mp4 (bytes or a path); for tests and inspection."""
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with av.open(src) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def codec_available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # PyAV raises UnknownCodecError (a ValueError subclass in some versions)
        return False
    return True
