"""The one curated-sample schema every curation stage writes and `mix`/`tokenize` read.

    python -c "from metamorph.data.schema import Sample; help(Sample)"

On disk (WebDataset tar shards, read with default arguments by `webdataset` and
`ray.data.read_webdataset`; layout in ``metamorph.data.shards.sample_members``), one sample is:

    {key}.json        the record below (UTF-8 JSON); ``images[i]`` gives image i's ext and role
    {key}.images.mp   msgpack {"images": [image 0 bytes, image 1 bytes, ...]} (png by default,
                      jpg/webp allowed); [] for a text-only sample

``key`` is a filesystem-safe id (``[A-Za-z0-9_-]``, no dots: webdataset splits keys at the
first dot). In the conversation, every image appears as the literal placeholder ``<image>``, in
order; ``images[i]`` says whether image i sits in the prompt (an input) or the response (a
generation target the VPiT visual loss is applied to).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("user", "assistant")
IMAGE_ROLES = ("prompt", "response")
# task names used across stages, evaluation and mixing
TASKS = (
    "image_qa",  # image(s) in the prompt, text answer
    "video_qa",  # sampled frames in the prompt, text answer
    "t2i",  # "Generate an image of ..." -> response image
    "frame_prediction",  # prompt frames -> response frames
    "visual_thinking",  # "Think visually ..." -> response: crop image, then answer
    "image_edit",  # input image + instruction -> output image
)
_KEY_OK = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(kw_only=True)
class Turn:
    role: Literal["user", "assistant"]
    content: str  # text with one `<image>` per image, in order


@dataclass(kw_only=True)
class ImageRef:
    ext: str  # member extension without dot: "png", "jpg", "webp"
    role: Literal["prompt", "response"]


@dataclass(kw_only=True)
class Sample:
    id: str  # unique, stable across reruns: "{source}-{upstream id}"
    source: str  # the configured source name this record came from
    family: str  # understanding | generation | video | visual_thinking | image_edit
    task: str  # one of TASKS
    split: Literal["train", "heldout"]
    conversation: list[Turn]
    images: list[ImageRef] = field(default_factory=list)
    # free-form, JSON-serialisable facts kept for evaluation (toy-world attributes, bbox, answer
    # options, the ground-truth answer, the caption); never used as model input.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return sample_key(self.id)

    def to_json(self) -> dict[str, Any]:
        # by hand, not dataclasses.asdict: asdict deep-copies ``meta`` (toy-world scene dicts),
        # which made serialisation the slowest step of writing shards. ``meta`` is shared, not copied.
        return {
            "id": self.id,
            "source": self.source,
            "family": self.family,
            "task": self.task,
            "split": self.split,
            "conversation": [{"role": t.role, "content": t.content} for t in self.conversation],
            "images": [{"ext": i.ext, "role": i.role} for i in self.images],
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Sample":
        d = dict(d)
        d["conversation"] = [Turn(**t) for t in d["conversation"]]
        d["images"] = [ImageRef(**i) for i in d.get("images", [])]
        return cls(**d)

    def validate(self) -> None:
        n_ph = sum(t.content.count(IMAGE_PLACEHOLDER) for t in self.conversation)
        if n_ph != len(self.images):
            raise ValueError(f"sample {self.id}: {n_ph} <image> placeholders but {len(self.images)} images")
        if self.task not in TASKS:
            raise ValueError(f"sample {self.id}: unknown task {self.task!r}")
        for t in self.conversation:
            if t.role not in ROLES:
                raise ValueError(f"sample {self.id}: unknown role {t.role!r}")
        # images in assistant turns are responses, in user turns prompts
        i = 0
        for t in self.conversation:
            for _ in range(t.content.count(IMAGE_PLACEHOLDER)):
                want = "response" if t.role == "assistant" else "prompt"
                if self.images[i].role != want:
                    raise ValueError(f"sample {self.id}: image {i} is in a {t.role} turn but marked {self.images[i].role}")
                i += 1


def role_content(turn: Any) -> tuple[str, str]:
    """(role, content) of a conversation turn, a ``Turn`` or its JSON dict."""
    if isinstance(turn, dict):
        return turn["role"], turn["content"]
    return turn.role, turn.content


def sample_key(sample_id: str) -> str:
    """A webdataset-safe key for an id; a short hash keeps distinct ids distinct after escaping."""
    safe = _KEY_OK.sub("_", sample_id)[:80]
    return f"{safe}-{hashlib.sha1(sample_id.encode()).hexdigest()[:8]}"


def dumps(sample: Sample) -> bytes:
    return json.dumps(sample.to_json(), ensure_ascii=False, sort_keys=True).encode("utf-8")


def dumps_splits(sample: Sample, splits: tuple[str, ...] = ("train", "heldout")) -> list[bytes]:
    """``dumps(sample)`` with ``split`` set to each of ``splits``, from one encoding: with sorted
    keys, "split" and "task" are the last two top-level keys, so the records differ only in that
    tail (``meta`` may hold a "split" of its own; it comes earlier and stays)."""
    task = json.dumps(sample.task, ensure_ascii=False)
    first = replace(sample, split=splits[0])
    rec = dumps(first)
    tail = f'"split": {json.dumps(splits[0])}, "task": {task}}}'.encode()
    if not rec.endswith(tail):  # a schema change moved the keys: encode each one
        return [rec] + [dumps(replace(sample, split=s)) for s in splits[1:]]
    head = rec[: -len(tail)]
    return [rec] + [head + f'"split": {json.dumps(s)}, "task": {task}}}'.encode() for s in splits[1:]]
