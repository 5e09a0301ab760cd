"""Sample frames from a video file with PyAV at a fixed rate, capped in count.

    python -c "from metamorph.data.video import sample_frames; print(len(sample_frames('clip.mp4', fps=2, max_frames=8)))"

Frames are picked by presentation time: the first decoded frame at or after each target time
``start, start + 1/fps, ...`` until ``end`` or ``max_frames``. Decoding stops as soon as enough
frames are taken, so a long file costs only the seconds actually sampled.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from metamorph.data.readers.base import Reject

if TYPE_CHECKING:  # PyAV and PIL are imported in sample_frames: `metamorph plan` imports VideoConfig
    from PIL import Image

# FFmpeg demuxer names of the containers videos are published in (mp4/mov family, webm/mkv,
# avi, mpeg-ts/ps, ogg, flv); playlists, concat scripts and image sequences are refused
VIDEO_CONTAINERS = {"mov", "mp4", "m4a", "3gp", "3g2", "mj2", "matroska", "webm", "avi", "mpegts", "mpeg", "ogg", "flv", "m4v", "h264", "hevc"}


@dataclass(kw_only=True)
class VideoConfig:
    fps: float = 2.0  # frames sampled per second of video; SSv2 clips run 2-6 s, so 2 fps gives 4-12 frames
    max_frames: int = 8  # cap per video: every frame becomes N vision tokens in the sequence (64 at paper scale)
    max_video_bytes: int = 4 * 2**30  # a video file larger than this is file_too_large (never opened)
    # decode budget per video: frames decoded (sampled or skipped) and wall seconds; past either the
    # record is video_budget. 3000 frames is 100 s of 30 fps video after a seek; a 10 s SSv2 clip
    # decodes in well under a second
    max_decode_frames: int = 3000
    max_decode_seconds: float = 60.0

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps={self.fps}: must be > 0 (frames per second of video)")
        if self.max_frames < 1:
            raise ValueError(f"max_frames={self.max_frames}: must be >= 1")
        if self.max_video_bytes < 1024 or self.max_decode_frames < self.max_frames or not self.max_decode_seconds > 0:
            raise ValueError(
                f"max_video_bytes={self.max_video_bytes}, max_decode_frames={self.max_decode_frames}, "
                f"max_decode_seconds={self.max_decode_seconds}: need >= 1024 bytes, >= max_frames frames, > 0 s"
            )


def sample_frames(
    path: str,
    *,
    fps: float,
    max_frames: int,
    start: float = 0.0,
    end: Optional[float] = None,
    max_pixels: int = 64_000_000,
    max_decode_frames: int = 3000,
    max_decode_seconds: float = 60.0,
) -> list[Image.Image]:
    """RGB frames of ``path`` sampled at ``fps`` within ``[start, end)``; raise ``Reject``.

    FFmpeg may only use its ``file`` protocol: a playlist or concat file posing as a video cannot
    make the worker fetch a URL or another protocol's resource (``protocol_whitelist``), and only
    the containers videos come in are accepted (an HLS/concat demuxer would follow paths named in
    the file). Decoding stops past ``max_decode_frames`` frames or ``max_decode_seconds``."""
    import av

    if not os.path.exists(path):
        raise Reject("video_missing", f"{os.path.basename(path)} not found")
    if not os.path.isfile(path):
        raise Reject("not_regular_file", f"{os.path.basename(path)} is not a regular file")
    if os.path.getsize(path) == 0:
        raise Reject("video_empty", f"{os.path.basename(path)} is zero bytes")
    frames: list[Image.Image] = []
    t_start = time.monotonic()
    decoded = 0
    try:
        with av.open(path, mode="r", container_options={"protocol_whitelist": "file"}, timeout=max_decode_seconds) as container:
            fmt = container.format.name
            if not set(fmt.split(",")) & VIDEO_CONTAINERS:
                raise Reject("video_decode_error", f"container {fmt!r} is not a video file format")
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
                decoded += 1
                if decoded > max_decode_frames or time.monotonic() - t_start > max_decode_seconds:
                    raise Reject("video_budget", f"{decoded - 1} frames in {time.monotonic() - t_start:.1f} s without the sampled range "
                                 f"(max_decode_frames={max_decode_frames}, max_decode_seconds={max_decode_seconds})")
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
