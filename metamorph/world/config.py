"""Configuration of the toy world (sizes per family, rendering, video, question mix).

    python -c "from metamorph.world.config import WorldConfig; print(WorldConfig())"

Defaults are the `tiny` preset: a few thousand records that render in seconds on one core and
are enough for a small VPiT model to learn the attributes in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from metamorph.world import attributes as A


def _default_question_types() -> list[str]:
    return list(A.QUESTION_TYPES)


def _default_edit_types() -> list[str]:
    return list(A.EDIT_TYPES)


@dataclass(kw_only=True)
class WorldConfig:
    # --- rendering
    image_size: int = 32  # output side in px for every family except visual thinking (below)
    supersample: int = 4  # draw at image_size*supersample, box-downsample: anti-aliased edges;
    # 4 gives 16 coverage levels per edge pixel, more costs time quadratically for no visible gain
    large_frac: float = 0.85  # extent of a "large" object as a fraction of a grid cell's side
    small_frac: float = 0.5  # extent of a "small" object; below ~0.4 a 32 px cell (10.7 px) leaves
    # a small shape under 4 px, where triangle and diamond become indistinguishable
    jitter: float = 1.0  # 0..1: random offset of an object within its cell, as a fraction of the
    # free margin (cell - extent), so objects never overlap their neighbours
    min_objects: int = 1  # objects per still scene (understanding, image edit)
    max_objects: int = 3  # <= number of shapes: shapes are unique in a scene so "the circle" is unambiguous
    generation_max_objects: int = 1  # objects per generation (caption) scene; 1 lets a tiny model learn
    # text-to-image in minutes; raise towards max_objects for compositional captions

    # --- records per family (0 switches a family off; its directory is still created)
    n_understanding: int = 3000  # ImageQA conversations (LLaVA JSONL), one image each
    n_videoqa: int = 300  # VideoQA records (one mp4 each)
    n_generation: int = 2000  # captioned images (img2dataset tars)
    n_video: int = 300  # SSv2-style clips for frame prediction
    n_visual_thinking: int = 500  # Visual-CoT style question + bbox records
    n_image_edit: int = 500  # InstructPix2Pix style (input, instruction, output) rows

    # --- understanding questions
    question_types: list[str] = field(default_factory=_default_question_types)  # subset of
    # colour, shape, count, position, size; each question draws one uniformly from this list, so a
    # type listed k times is asked k times as often (tiny lists position three times)
    max_turns: int = 1  # question/answer turns per conversation (LLaVA multi-turn); 1 keeps every
    # record a single exact-match item for evaluation
    mc_fraction: float = 0.25  # fraction of questions posed as multiple choice (letter answers)

    # --- video (videoqa and video families)
    n_frames: int = 8  # frames per clip
    fps: int = 8  # frame rate written into the mp4 (8 frames at 8 fps = 1 s clips)
    video_codec: str = "libx264"  # "libx264" (H.264, the common case) or "mpeg4" (MPEG-4 part 2)
    video_quality: int = 12  # libx264 constant QP (lower is better; mpeg4 ignores it): 12 keeps the
    # decoded frames within ~1.2 levels (mean abs) of the render; yuv420p chroma is still subsampled
    min_travel: float = 0.35  # distance an object moves over a clip, as a fraction of image_size
    max_travel: float = 0.6
    video_max_distractors: int = 1  # static objects beside the moving one (0..this many)
    # questions per VideoQA clip (distinct types: direction, mover shape, mover colour; 1..3). The
    # frames dominate a clip's tokens, so each extra turn is cheap supervision; 1 = one random question
    video_turns: int = 1
    # the mover starts on a grid-cell centre and ends on the centre of the cell 1 or 2 steps away
    # (min/max_travel unused), off any distractor's cell: first and last frames look like centred
    # still scenes (jitter 0). False: it starts anywhere and travels min..max_travel
    video_on_grid: bool = False

    # --- visual thinking
    visual_thinking_scale: int = 2  # these images are image_size*scale px, so after curation's resize
    # the small target object is tiny and the bbox crop is worth looking at
    visual_thinking_max_distractors: int = 3  # large objects beside the small target (1..this many)
    bbox_pad: float = 0.25  # bbox margin around the target, as a fraction of its extent per side

    # --- image edit
    edit_types: list[str] = field(default_factory=_default_edit_types)  # subset of EDIT_TYPES

    # --- encoding and layout
    jpeg_quality: int = 95  # generation images are JPEG (as img2dataset writes); 4:4:4, so small
    # objects keep their colour
    shard_size: int = 1000  # records per generation tar / image-edit parquet file (<= 10000:
    # img2dataset keys are 5-digit shard + 4-digit index)
    seed_offset: int = 0  # added to the pipeline seed: a different world under the same pipeline seed

    def __post_init__(self) -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"world.{key}: {msg}")

        need(self.image_size >= 12, "image_size", f"{self.image_size} px is too small for a 3x3 grid; use >= 12")
        need(self.image_size % 2 == 0, "image_size", "must be even (yuv420p video needs even sides)")
        need(1 <= self.supersample <= 16, "supersample", "must be in 1..16")
        need(0.1 <= self.small_frac < self.large_frac <= 1.0, "small_frac/large_frac",
             "need 0.1 <= small_frac < large_frac <= 1.0")
        need(0.0 <= self.jitter <= 1.0, "jitter", "must be in [0, 1]")
        need(1 <= self.min_objects <= self.max_objects <= len(A.SHAPES), "min_objects/max_objects",
             f"need 1 <= min_objects <= max_objects <= {len(A.SHAPES)} (shapes are unique per scene)")
        need(1 <= self.generation_max_objects <= len(A.SHAPES), "generation_max_objects",
             f"must be in 1..{len(A.SHAPES)}")
        for k in ("n_understanding", "n_videoqa", "n_generation", "n_video", "n_visual_thinking", "n_image_edit"):
            need(getattr(self, k) >= 0, k, "must be >= 0")
        bad = sorted(set(self.question_types) - set(A.QUESTION_TYPES))
        need(not bad and bool(self.question_types), "question_types",
             f"unknown {bad} or empty; choose from {list(A.QUESTION_TYPES)}")
        need(self.max_turns >= 1, "max_turns", "must be >= 1")
        need(1 <= self.video_turns <= 3, "video_turns", "must be in 1..3 (direction, mover shape, mover colour)")
        need(0.0 <= self.mc_fraction <= 1.0, "mc_fraction", "must be in [0, 1]")
        need(self.n_frames >= 2, "n_frames", "a clip needs >= 2 frames to move")
        need(self.fps >= 1, "fps", "must be >= 1")
        need(self.video_codec in ("libx264", "mpeg4"), "video_codec", "use 'libx264' or 'mpeg4'")
        need(0 <= self.video_quality <= 51, "video_quality", "must be in 0..51")
        need(0.05 <= self.min_travel <= self.max_travel <= 0.7, "min_travel/max_travel",
             "need 0.05 <= min_travel <= max_travel <= 0.7 (the object must stay in frame)")
        need(0 <= self.video_max_distractors <= len(A.SHAPES) - 1, "video_max_distractors",
             f"must be in 0..{len(A.SHAPES) - 1}")
        need(1 <= self.visual_thinking_scale <= 8, "visual_thinking_scale", "must be in 1..8")
        need(1 <= self.visual_thinking_max_distractors <= len(A.SHAPES) - 1, "visual_thinking_max_distractors",
             f"must be in 1..{len(A.SHAPES) - 1}")
        need(0.0 <= self.bbox_pad <= 2.0, "bbox_pad", "must be in [0, 2]")
        bad = sorted(set(self.edit_types) - set(A.EDIT_TYPES))
        need(not bad and bool(self.edit_types), "edit_types",
             f"unknown {bad} or empty; choose from {list(A.EDIT_TYPES)}")
        need(50 <= self.jpeg_quality <= 100, "jpeg_quality", "must be in 50..100")
        need(1 <= self.shard_size <= 10000, "shard_size", "must be in 1..10000")
        need(self.seed_offset >= 0, "seed_offset", "must be >= 0")

    @property
    def visual_thinking_size(self) -> int:
        return self.image_size * self.visual_thinking_scale
