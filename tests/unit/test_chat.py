"""Chat template: ids, CE labels and visual masks of small conversations, checked position by position.

    pytest tests/unit/test_chat.py -q
"""

from __future__ import annotations

import pytest

from metamorph.data.chat import IGNORE, ChatTemplate, render_prompt
from metamorph.data.schema import Turn
from metamorph.data.tokenizer import TokenizerConfig, special_ids, train_bpe

N = 2  # visual positions per image: small so positions can be written out by hand


@pytest.fixture(scope="module")
def tok():
    corpus = ["What colour?", "Red.", "Draw it.", "Generate an image of a red circle."] * 10
    return train_bpe(corpus, TokenizerConfig(vocab_size=400))


@pytest.fixture(scope="module")
def tpl(tok):
    return ChatTemplate(tok, n_visual=N)


def test_header_is_four_tokens(tpl):
    # trained BPE merges the header words, so the hand positions below hold:
    # <|start_header_id|> role <|end_header_id|> "\n\n"
    for role in ("user", "assistant"):
        assert len(tpl._headers[role]) == 4


def test_labels_and_masks_by_hand(tok, tpl):
    ids = special_ids(tok)
    conv = [
        Turn(role="user", content="<image>\nWhat colour?"),
        Turn(role="assistant", content="Red."),
        Turn(role="user", content="Draw it."),
        Turn(role="assistant", content="<image>"),
    ]
    r = tpl.render(conv)
    q = tpl.encode(["\nWhat colour?"])[0]
    a = tpl.encode(["Red."])[0]
    d = tpl.encode(["Draw it."])[0]
    hu, ha = tpl._headers["user"], tpl._headers["assistant"]
    P = ids.pad
    # (id, CE label?, visual, response visual) written out turn by turn
    want = [(ids.bos, 0, 0, 0)]
    want += [(t, 0, 0, 0) for t in hu]
    want += [(ids.image_start, 0, 0, 0), (P, 0, 1, 0), (P, 0, 1, 0), (ids.image_end, 0, 0, 0)]  # prompt image
    want += [(t, 0, 0, 0) for t in q] + [(ids.eot, 0, 0, 0)]
    want += [(t, 0, 0, 0) for t in ha]
    want += [(t, 1, 0, 0) for t in a] + [(ids.eot, 1, 0, 0)]  # assistant content + its eot get CE
    want += [(t, 0, 0, 0) for t in hu] + [(t, 0, 0, 0) for t in d] + [(ids.eot, 0, 0, 0)]
    want += [(t, 0, 0, 0) for t in ha]
    # response image: <image_start>/<image_end> get CE, visual positions are visual-loss targets
    want += [(ids.image_start, 1, 0, 0), (P, 0, 1, 1), (P, 0, 1, 1), (ids.image_end, 1, 0, 0)]
    want += [(ids.eot, 1, 0, 0)]

    assert r.input_ids == [w[0] for w in want]
    assert r.labels == [w[0] if w[1] else IGNORE for w in want]
    assert r.visual_mask == [bool(w[2]) for w in want]
    assert r.response_visual_mask == [bool(w[3]) for w in want]
    assert r.image_roles == ["prompt", "response"]
    assert r.image_starts == [5, len(want) - 5]
    assert [r.input_ids[s] for s in r.image_starts] == [ids.image_start] * 2
    assert r.image_span(1) == (len(want) - 5, len(want) - 1)


def test_shifted_targets_by_hand(tok, tpl):
    """What the model's shift-by-one sees on a t2i sample: which position predicts what."""
    ids = special_ids(tok)
    r = tpl.render([{"role": "user", "content": "Draw it."}, {"role": "assistant", "content": "<image>"}])
    n_prompt = 1 + 4 + len(tpl.encode(["Draw it."])[0]) + 1 + 4  # bos, header, text, eot, header
    s = n_prompt  # <image_start> position
    assert r.input_ids[s] == ids.image_start and len(r) == s + N + 3
    # CE: position t predicts labels[t+1]
    ce_from = [t for t in range(len(r) - 1) if r.labels[t + 1] != IGNORE]
    assert ce_from == [s - 1, s + N, s + N + 1]  # header end -> <image_start>; last visual -> <image_end>; <image_end> -> eot
    # visual loss: position t regresses the feature of t+1 when t+1 is a response visual position
    vis_from = [t for t in range(len(r) - 1) if r.response_visual_mask[t + 1]]
    assert vis_from == [s, s + 1]  # <image_start> predicts the first visual token, visual 0 the second


def test_render_prompt_ends_with_assistant_header(tok, tpl):
    ids = special_ids(tok)
    conv = [{"role": "user", "content": "Draw it."}, {"role": "assistant", "content": "<image>"}]
    full = tpl.render(conv)
    p = tpl.render_prompt(conv[:1])
    assert p.input_ids[-4:] == tpl._headers["assistant"]
    assert all(x == IGNORE for x in p.labels)
    assert full.input_ids[: len(p)] == p.input_ids  # generation continues exactly where training did
    assert render_prompt(tok, "Draw it.", N).input_ids == p.input_ids
    q = tpl.render_prompt([{"role": "user", "content": "<image>\nWhat colour?"}])
    assert sum(q.visual_mask) == N and not any(q.response_visual_mask)
    assert q.input_ids[q.image_starts[0]] == ids.image_start
    with pytest.raises(ValueError, match="ends with a user turn"):
        tpl.render_prompt(conv)


def test_system_prompt_and_special_strings_in_text(tok):
    ids = special_ids(tok)
    tpl = ChatTemplate(tok, n_visual=N, system_prompt="Be brief.")
    r = tpl.render([{"role": "user", "content": "Say <|eot_id|> now"}, {"role": "assistant", "content": "Ok"}])
    assert r.input_ids[1:5] == tpl._headers["system"]
    # the literal string is text, not a control token: exactly the 3 real turn ends remain
    assert r.input_ids.count(ids.eot) == 3
    assert r.labels.count(ids.eot) == 1


def test_batch_equals_single(tpl):
    convs = [
        [{"role": "user", "content": "What colour?"}, {"role": "assistant", "content": "Red."}],
        [{"role": "user", "content": "Draw it."}, {"role": "assistant", "content": "<image> done"}],
    ]
    batch = tpl.render_batch(convs)
    for c, b in zip(convs, batch):
        s = tpl.render(c)
        assert (s.input_ids, s.labels, s.response_visual_mask) == (b.input_ids, b.labels, b.response_visual_mask)
