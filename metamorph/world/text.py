"""Words for toy-world scenes: captions, questions with canonical answers, edit instructions.

    python -c "import numpy as np; from metamorph.world.render import sample_scene; from metamorph.world.text import *; r = np.random.default_rng(0); s = sample_scene(r, image_size=32); print(caption(r, s)); print(image_question(r, s, 'colour', mc=True))"

Every question comes back as a ``QA``: the text to show the model and the exact answer plus the
facts an evaluator needs (type, target object, options). Answers are canonical: lowercase
attribute words ("red", "circle", "top left", "large"), digits for counts ("2"), and a capital
letter for multiple choice ("B"), so accuracy is exact string match. Templates vary the wording
(as real instruction data does) but never the answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from metamorph.world import attributes as A
from metamorph.world.render import Obj, Scene, pick, sample

# LLaVA-1.5's suffixes for short-answer and multiple-choice VQA
SHORT_ANSWER = "Answer the question using a single word or phrase."
MC_ANSWER = "Answer with the option's letter from the given choices directly."

CAPTION_TEMPLATES = (
    "{objs} on {bg}",
    "{objs} against {bg}",
    "a picture of {objs} on {bg}",
    "an image of {objs} on {bg}",
    "{bg_cap} with {objs}",
)

COLOUR_Q = ("What color is the {shape}?", "What is the color of the {shape}?", "Which color does the {shape} have?")
SHAPE_Q = ("What shape is in the {position}?", "Which shape is located in the {position}?",
           "What is the shape of the {colour} object in the {position}?")
COUNT_Q = ("How many objects are there?", "How many shapes are in the image?")
COUNT_COLOUR_Q = ("How many {colour} objects are there?", "How many {colour} shapes are in the image?")
POSITION_Q = ("Where is the {shape}?", "Where is the {colour} {shape} located?",
              "In which part of the image is the {shape}?")
SIZE_Q = ("Is the {shape} large or small?", "What size is the {shape}?")

DIRECTION_Q = ("What direction does the {shape} move?", "In which direction is the {colour} {shape} moving?",
               "Which way does the {shape} move?")
MOVER_SHAPE_Q = ("Which shape is moving?", "What is the shape of the moving object?")
MOVER_COLOUR_Q = ("What color is the moving object?", "What is the color of the object that moves?")

SMALL_COLOUR_Q = ("What color is the small object?", "What is the color of the small {shape}?")
SMALL_SHAPE_Q = ("What shape is the small object?", "What is the small {colour} object?")

EDIT_TEMPLATES = {
    "recolour": ("make the {shape} {colour}", "change the color of the {shape} to {colour}",
                 "turn the {shape} {colour}", "paint the {shape} {colour}"),
    "move": ("move the {shape} {direction}", "shift the {shape} one step {direction}",
             "move the {shape} to the {position}"),
    "grow": ("make the {shape} bigger", "make the {shape} larger", "enlarge the {shape}"),
    "shrink": ("make the {shape} smaller", "shrink the {shape}"),
    "remove": ("remove the {shape}", "delete the {shape}", "take away the {shape}"),
    "add": ("add {obj}", "put {obj}", "draw {obj}"),
    "background": ("make the background {background}", "change the background to {background}",
                   "turn the background {background}"),
}


@dataclass(kw_only=True)
class QA:
    question: str  # without the answer-format suffix
    answer: str  # canonical answer (the letter for multiple choice)
    type: str  # colour | shape | count | position | size | direction | ...
    target: Optional[str] = None  # shape of the object asked about, if any
    truth: str = ""  # the attribute value (== answer for open questions)
    options: list[str] = field(default_factory=list)  # multiple choice options, in letter order

    @property
    def prompt(self) -> str:
        """The question as shown to the model: options and the answer-format instruction."""
        if self.options:
            opts = "\n".join(f"{A.MC_LETTERS[i]}. {o}" for i, o in enumerate(self.options))
            return f"{self.question}\n{opts}\n{MC_ANSWER}"
        return f"{self.question}\n{SHORT_ANSWER}"

    def to_meta(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = "mc" if self.options else "open"
        return d


def _mc(rng: np.random.Generator, qa: QA, vocab: list[str]) -> QA:
    """Turn an open question into up to 4-way multiple choice with the truth among the options."""
    others = [v for v in vocab if v != qa.truth]
    options = sample(rng, others, min(len(A.MC_LETTERS), len(vocab)) - 1) + [qa.truth]
    options = sample(rng, options, len(options))  # shuffle so the letter carries no prior
    qa.options = options
    qa.answer = A.MC_LETTERS[options.index(qa.truth)]
    return qa


def _open(question: str, truth: str, type_: str, target: Optional[str] = None) -> QA:
    return QA(question=question, answer=truth, type=type_, target=target, truth=truth)


def caption(rng: np.random.Generator, scene: Scene) -> str:
    """"a large red circle in the top left on a white background", in a random template."""
    phrases = [o.phrase(scene.image_size) for o in scene.objects]
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    bg = f"{A.article(scene.background)} {scene.background} background"
    return pick(rng, CAPTION_TEMPLATES).format(objs=objs, bg=bg, bg_cap=bg)


def image_question(rng: np.random.Generator, scene: Scene, qtype: str, mc: bool = False) -> QA:
    """One question about a still scene (shapes are unique in a scene, so "the circle" is one object)."""
    n = scene.image_size
    o: Obj = pick(rng, scene.objects)
    pos = o.position(n)
    if qtype == "colour":
        qa, vocab = _open(pick(rng, COLOUR_Q).format(shape=o.shape), o.colour, qtype, o.shape), list(A.COLOURS)
    elif qtype == "shape":
        q = pick(rng, SHAPE_Q).format(position=pos, colour=o.colour)
        qa, vocab = _open(q, o.shape, qtype, o.shape), list(A.SHAPES)
    elif qtype == "position":
        q = pick(rng, POSITION_Q).format(shape=o.shape, colour=o.colour)
        qa, vocab = _open(q, pos, qtype, o.shape), list(A.POSITIONS)
    elif qtype == "size":
        qa, vocab = _open(pick(rng, SIZE_Q).format(shape=o.shape), o.size, qtype, o.shape), list(A.SIZES)
    elif qtype == "count":
        vocab = [str(k) for k in range(0, 5)]
        if rng.random() < 0.5:
            qa = _open(pick(rng, COUNT_Q), str(len(scene.objects)), qtype)
        else:  # colour-conditioned count: 0 is a valid answer
            colour = pick(rng, list(A.COLOURS))
            k = sum(x.colour == colour for x in scene.objects)
            qa = _open(pick(rng, COUNT_COLOUR_Q).format(colour=colour), str(k), qtype)
    else:
        raise ValueError(f"unknown question type {qtype!r}; known: {A.QUESTION_TYPES}")
    return _mc(rng, qa, vocab) if mc else qa


VIDEO_QUESTION_TYPES = ("direction", "mover_shape", "mover_colour")
SMALL_OBJECT_QUESTION_TYPES = ("colour", "shape")


def video_question(rng: np.random.Generator, mover: Obj, direction: str, mc: bool = False,
                   kind: Optional[str] = None) -> QA:
    """A question about the moving object of a clip; direction questions are half of them
    (``kind``, one of VIDEO_QUESTION_TYPES, asks that type instead: evaluation asks every type)."""
    r = rng.random()
    if kind is not None:
        r = {"direction": 0.0, "mover_shape": 0.5, "mover_colour": 0.75}[kind]
    if r < 0.5:
        q = pick(rng, DIRECTION_Q).format(shape=mover.shape, colour=mover.colour)
        qa, vocab = _open(q, direction, "direction", mover.shape), list(A.DIRECTIONS)
    elif r < 0.75:
        qa, vocab = _open(pick(rng, MOVER_SHAPE_Q), mover.shape, "mover_shape", mover.shape), list(A.SHAPES)
    else:
        qa, vocab = _open(pick(rng, MOVER_COLOUR_Q), mover.colour, "mover_colour", mover.shape), list(A.COLOURS)
    return _mc(rng, qa, vocab) if mc else qa


def small_object_question(rng: np.random.Generator, target: Obj, kind: Optional[str] = None) -> QA:
    """Visual thinking: ask the colour or the shape of the one small object (``kind``: that one)."""
    if (rng.random() < 0.5) if kind is None else kind == "colour":
        return _open(pick(rng, SMALL_COLOUR_Q).format(shape=target.shape), target.colour, "colour", target.shape)
    return _open(pick(rng, SMALL_SHAPE_Q).format(colour=target.colour), target.shape, "shape", target.shape)


def edit_instruction(rng: np.random.Generator, kind: str, **slots: str) -> str:
    return pick(rng, EDIT_TEMPLATES[kind]).format(**slots)


def ssv2_label(template: str, placeholder: str) -> str:
    return template.replace("[something]", placeholder)
