"""Sample frames from a video file with PyAV at a fixed rate, capped in count.

    python -c "from metamorph.data.video import sample_frames; print(len(sample_frames('clip.mp4', fps=2, max_frames=8)))"

Frames are picked by presentation time: the first decoded frame at or after each target time
``start, start + 1/fps, ...`` until ``end`` or ``max_frames``. Decoding stops as soon as enough
frames are taken, so a long file costs only the seconds actually sampled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import av
from PIL import Image

from metamorph.data.readers.base import Reject


@dataclass(kw_only=True)
class VideoConfig:
    fps: float = 2.0  # frames sampled per second of video; SSv2 clips run 2-6 s, so 2 fps gives 4-12 frames
    max_frames: int = 8  # cap per video: every frame becomes N vision tokens in the sequence (64 at paper scale)

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps}: must be > 0 (frames per second of video)")
        if self.max_frames < 1:
            raise ValueError(f"max_frames={self.max_frames}: must be >= 1")


def sample_frames(
    path: str,
    *,
    fps: float,
    max_frames: int,
    start: float = 0.0,
    end: Optional[float] = None,
    max_pixels: int = 64_000_000,
) -> list[Image.Image]:
    """RGB frames of ``path`` sampled at ``fps`` within ``[start, end)``; raise ``Reject``."""
    if not os.path.exists(path):
        raise Reject("video_missing", f"{os.path.basename(path)} not found")
    if os.path.getsize(path) == 0:
        raise Reject("video_empty", f"{os.path.basename(path)} is zero bytes")
    frames: list[Image.Image] = []
    try:
        with av.open(path, mode="r") as container:
            if not container.streams.video:
                raise Reject("video_decode_error", "no video stream")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            if w * h > max_pixels:
                raise Reject("decompression_bomb", f"video frames {w}x{h} > max_pixels={max_pixels}")
            if start > 0 and stream.time_base is not None:
                # lands on the keyframe before `start`; frames before it are skipped by time below
                container.seek(int(start / stream.time_base), stream=stream, backward=True)
            step = 1.0 / fps
            target = start
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else i / float(stream.average_rate or 25)
                if end is not None and t >= end:
                    break
                if t + 1e-6 < target:
                    continue
                frames.append(frame.to_image().convert("RGB"))
                if len(frames) >= max_frames:
                    break
                # advance past t too: a variable-rate stream may jump several targets at once
                while target <= t + 1e-6:
                    target += step
    except Reject:
        raise
    except (av.error.FFmpegError, ValueError, OSError, IndexError) as e:
        raise Reject("video_decode_error", f"{type(e).__name__}: {e}") from None
    if not frames:
        raise Reject("video_empty", "no frames decoded in the requested range")
    return frames
