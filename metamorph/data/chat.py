"""Llama-3-style chat template: a conversation -> token ids, CE labels and visual-position masks.

    python -m metamorph.data.chat /tmp/tok      # renders a toy t2i conversation and prints it

Layout of one rendered sample (Llama-3-Instruct's format, images expanded in place):

    <|begin_of_text|>
    <|start_header_id|>user<|end_header_id|>\\n\\n   {content}  <|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n {content}  <|eot_id|>   ...

Every ``<image>`` placeholder in a content becomes ``<image_start>`` + N visual positions +
``<image_end>``; a visual position's input id is the pad id (the model embeds the image feature
there instead). Labels are unshifted targets (the model shifts by one), -100 where no CE:

* CE on assistant content and its ``<|eot_id|>`` only; bos, headers and user turns are masked.
* A response image (in an assistant turn): ``<image_start>`` and ``<image_end>`` get CE, the N
  visual positions are -100 and ``response_visual_mask`` marks them (the visual-loss targets).
* A prompt image (in a user turn): everything masked, ``visual_mask`` only.

Text between placeholders is encoded piece by piece with special-token strings split as plain
text, so a literal ``<|eot_id|>`` in data can never act as a control token.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Sequence

from metamorph.data.schema import IMAGE_PLACEHOLDER, role_content
from metamorph.data.tokenizer import SpecialIds, special_ids

IGNORE = -100  # label of a position without CE (torch's cross_entropy ignore_index)


@dataclass
class Rendered:
    """One rendered conversation; all per-position lists have the same length."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    visual_mask: list[bool] = field(default_factory=list)
    response_visual_mask: list[bool] = field(default_factory=list)
    image_starts: list[int] = field(default_factory=list)  # position of each image's <image_start>
    image_roles: list[str] = field(default_factory=list)  # "prompt" | "response", per image
    n_visual: int = 0  # visual positions per image (N)

    def __len__(self) -> int:
        return len(self.input_ids)

    def image_span(self, i: int) -> tuple[int, int]:
        """[start, end) of image i's block, <image_start> and <image_end> included."""
        s = self.image_starts[i]
        return s, s + self.n_visual + 2

    def _extend(self, ids: Sequence[int], labelled: bool) -> None:
        self.input_ids.extend(ids)
        self.labels.extend(ids if labelled else [IGNORE] * len(ids))
        self.visual_mask.extend([False] * len(ids))
        self.response_visual_mask.extend([False] * len(ids))


class ChatTemplate:
    """Renders conversations for one tokenizer and one N (visual positions per image)."""

    def __init__(self, tokenizer, n_visual: int, system_prompt: str | None = None):
        if n_visual <= 0:
            raise ValueError(f"n_visual={n_visual} must be > 0 (the vision encoder's n_tokens)")
        self.tokenizer = tokenizer
        self.n_visual = n_visual
        self.system_prompt = system_prompt
        self.ids: SpecialIds = special_ids(tokenizer)
        # headers are constant: encode once
        self._headers = {
            role: [self.ids.start_header, *self.encode([role])[0], self.ids.end_header, *self.encode(["\n\n"])[0]]
            for role in ("system", "user", "assistant")
        }

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Plain text -> ids (no bos, special-token strings treated as text), batched in Rust."""
        if not texts:
            return []
        out = self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return [list(x) for x in out]

    # ---- training: ids + labels
    def render(self, conversation: Sequence[Any]) -> Rendered:
        return self.render_batch([conversation])[0]

    def render_batch(self, conversations: Sequence[Sequence[Any]]) -> list[Rendered]:
        """Render with labels (one tokenizer call for all text pieces of all conversations).

        A conversation without an assistant turn renders with no CE at all; the packer drops it.
        """
        return self._render_many(conversations, prompt=False)

    # ---- inference: ends with the assistant header, no labels
    def render_prompt(self, conversation: Sequence[Any] | str) -> Rendered:
        """The prompt for generation: the conversation (ending in a user turn) + the assistant header.

        A plain string is one user turn. Images anywhere in it are visual positions the caller fills
        with encoder features (``visual_mask``); ``response_visual_mask`` marks images in earlier
        assistant turns.
        """
        if isinstance(conversation, str):
            conversation = [{"role": "user", "content": conversation}]
        if not conversation or role_content(conversation[-1])[0] != "user":
            raise ValueError("render_prompt needs a conversation that ends with a user turn (drop the answer)")
        return self._render_many([conversation], prompt=True)[0]

    def _render_many(self, conversations: Sequence[Sequence[Any]], prompt: bool) -> list[Rendered]:
        # plan: per conversation a list of ("ids", ids, labelled) | ("text", k, labelled) |
        # ("image", role); text pieces of all conversations are encoded in one batch
        texts: list[str] = []
        plans: list[list[tuple]] = []
        for conv in conversations:
            plan: list[tuple] = [("ids", [self.ids.bos], False)]
            turns = [role_content(t) for t in conv]
            if self.system_prompt:
                turns.insert(0, ("system", self.system_prompt))
            for role, content in turns:
                if role not in self._headers:
                    raise ValueError(f"unknown role {role!r} (user, assistant)")
                supervised = role == "assistant" and not prompt
                plan.append(("ids", self._headers[role], False))
                for j, piece in enumerate(content.split(IMAGE_PLACEHOLDER)):
                    if j > 0:
                        plan.append(("image", "response" if role == "assistant" else "prompt"))
                    if piece:
                        plan.append(("text", len(texts), supervised))
                        texts.append(piece)
                plan.append(("ids", [self.ids.eot], supervised))
            if prompt:
                plan.append(("ids", self._headers["assistant"], False))
            plans.append(plan)
        encoded = self.encode(texts)
        return [self._assemble(plan, encoded, prompt) for plan in plans]

    def _assemble(self, plan: list[tuple], encoded: list[list[int]], prompt: bool) -> Rendered:
        r = Rendered(n_visual=self.n_visual)
        n = self.n_visual
        for item in plan:
            kind = item[0]
            if kind == "ids":
                r._extend(item[1], item[2])
            elif kind == "text":
                r._extend(encoded[item[1]], item[2])
            else:
                response = item[1] == "response"
                r.image_starts.append(len(r.input_ids))
                r.image_roles.append(item[1])
                ce = response and not prompt  # <image_start>/<image_end> are predicted tokens
                r.input_ids.extend([self.ids.image_start] + [self.ids.pad] * n + [self.ids.image_end])
                r.labels.extend(
                    [self.ids.image_start if ce else IGNORE] + [IGNORE] * n + [self.ids.image_end if ce else IGNORE]
                )
                r.visual_mask.extend([False] + [True] * n + [False])
                r.response_visual_mask.extend([False] + [response] * n + [False])
        return r


def jinja_chat_template(tokenizer, n_visual: int, system_prompt: str | None = None) -> str:
    """The Jinja ``chat_template`` that renders what ``ChatTemplate`` renders (tokenizer.chat_template).

    ``tokenizer.apply_chat_template(conversation, add_generation_prompt=...)`` then gives the same
    ids as ``ChatTemplate.render`` / ``render_prompt`` (tests hold them equal on multi-turn, image
    and text-only conversations). A content is a string with ``<image>`` placeholders, or a list of
    ``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts; each image becomes
    ``<image_start>`` + N pad tokens + ``<image_end>`` (the model fills the N positions with the
    vision encoder's tokens). One difference remains by design: the renderer treats a literal
    special-token string inside a content as text, ``apply_chat_template`` as the special token.
    """
    if n_visual <= 0:
        raise ValueError(f"n_visual={n_visual} must be > 0 (the vision encoder's n_tokens)")
    ids = special_ids(tokenizer)
    tok = tokenizer.convert_ids_to_tokens
    image = tok(ids.image_start) + tok(ids.pad) * n_visual + tok(ids.image_end)
    header = lambda role: tok(ids.start_header) + role + tok(ids.end_header) + "\n\n"  # noqa: E731
    system = ""
    if system_prompt:
        system = header("system") + system_prompt.replace(IMAGE_PLACEHOLDER, image) + tok(ids.eot)
    esc = lambda text: text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")  # noqa: E731
    return (
        "{{- '" + esc(tok(ids.bos) + system) + "' -}}"
        "{%- for message in messages -%}"
        "{{- '" + esc(tok(ids.start_header)) + "' + message['role'] + '" + esc(tok(ids.end_header) + "\n\n") + "' -}}"
        "{%- if message['content'] is string -%}"
        "{{- message['content'] | replace('" + IMAGE_PLACEHOLDER + "', '" + esc(image) + "') -}}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{- '" + esc(image) + "' -}}"
        "{%- else -%}{{- part['text'] | replace('" + IMAGE_PLACEHOLDER + "', '" + esc(image) + "') -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{- '" + esc(tok(ids.eot)) + "' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + esc(header("assistant")) + "' -}}{%- endif -%}"
    )


def render_prompt(tokenizer, conversation: Sequence[Any] | str, n_visual: int, system_prompt: str | None = None) -> Rendered:
    """One-off ``ChatTemplate(tokenizer, n_visual, system_prompt).render_prompt(conversation)``."""
    return ChatTemplate(tokenizer, n_visual, system_prompt).render_prompt(conversation)


def main() -> None:
    from metamorph.data.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tokenizer", help="a tokenizer dir (the tokenize stage's `tokenizer` output)")
    ap.add_argument("--n-visual", type=int, default=4)
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer)
    tpl = ChatTemplate(tok, args.n_visual)
    conv = [
        {"role": "user", "content": "Generate an image of a red circle."},
        {"role": "assistant", "content": "<image>"},
    ]
    r = tpl.render(conv)
    for i, (t, lab, v, rv) in enumerate(zip(r.input_ids, r.labels, r.visual_mask, r.response_visual_mask)):
        piece = "<visual>" if v else tok.convert_ids_to_tokens(t)
        print(f"{i:3d} {piece!r:24} label={lab:5d} visual={int(v)} response_visual={int(rv)}")


if __name__ == "__main__":
    main()
