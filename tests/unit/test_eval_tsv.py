"""VLMEvalKit TSV reader and the option-letter likelihood scorer, on a TSV built here.

    pytest -q tests/unit/test_eval_tsv.py
"""

from __future__ import annotations

import base64
import csv
import io

import pytest
from PIL import Image

from metamorph.eval.tsv import MC_SUFFIX, read_tsv, score_items

COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def _b64(colour) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows):
    # the way VLMEvalKit exports: pandas to_csv(sep="\t"), i.e. csv with minimal quoting
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=COLS, delimiter="\t")
        w.writeheader()
        for r in rows:
            w.writerow({c: r.get(c, "") for c in COLS})
    return path


@pytest.fixture
def tsv(tmp_path):
    rows = [
        {"index": 10, "question": "What colour is the square?", "A": "red", "B": "blue", "C": "green", "D": "yellow",
         "answer": "A", "category": "colour", "l2-category": "perception", "image": _b64((220, 20, 20))},
        # MMBench stores a repeated image once; other rows hold the index of the row that has it
        {"index": 11, "question": "Is it\tround?\nThink.", "hint": "Look carefully.", "A": "yes", "B": "no",
         "C": "maybe", "D": "", "answer": "C", "category": "shape", "image": "10"},
        {"index": 12, "question": "No image here, pick B", "A": "x", "B": "y", "answer": "B", "category": "shape"},
        {"index": 13, "question": "Two images", "A": "p", "B": "q", "answer": "A", "category": "colour",
         "image": repr([_b64((0, 0, 255)), _b64((0, 255, 0))])},
    ]
    return write_tsv(tmp_path / "bench.tsv", rows)


def test_read_tsv(tsv):
    items = read_tsv(tsv)
    assert [i.index for i in items] == ["10", "11", "12", "13"]
    a, b, c, d = items
    assert a.options == {"A": "red", "B": "blue", "C": "green", "D": "yellow"} and a.answer == "A"
    assert Image.open(io.BytesIO(a.images[0])).getpixel((0, 0)) == (220, 20, 20)
    assert b.images == a.images  # the reference was resolved
    assert list(b.options) == ["A", "B", "C"]  # the empty D is not an option
    assert b.question == "Is it\tround?\nThink." and b.hint == "Look carefully."
    assert c.images == [] and d.category == "colour" and len(d.images) == 2
    content = b.conversation()[0]["content"]
    assert content == "<image>\nLook carefully.\nIs it\tround?\nThink.\nA. yes\nB. no\nC. maybe\n" + MC_SUFFIX
    assert "<image>" not in c.conversation()[0]["content"]
    assert d.conversation()[0]["content"].startswith("<image><image>\n")
    assert a.l2_category == "perception"
    assert len(read_tsv(tsv, limit=2)) == 2


def test_read_tsv_rejects_bad_files(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("index\tquestion\tanswer\n1\tq\tA\n")
    with pytest.raises(ValueError, match="option columns"):
        read_tsv(p)
    write_tsv(p, [{"index": 1, "question": "q", "A": "a", "B": "b", "answer": "C"}])
    with pytest.raises(ValueError, match="not one of the options"):
        read_tsv(p)


class Oracle:
    """Knows the answers of 'colour' items, always says the last option otherwise."""

    def __init__(self, items):
        self.by_q = {i.question: i for i in items}

    def option_logits(self, conversation, images, letters):
        q = next(i for t, i in self.by_q.items() if t in conversation[0]["content"])
        want = q.answer if q.category == "colour" else letters[-1]
        return [5.0 if k == want else 0.0 for k in letters]


def test_score_items_per_category(tsv):
    items = read_tsv(tsv)
    metrics, records = score_items(Oracle(items), items)
    # colour: 2/2 right; shape: item 11 answer C (last option, right), item 12 answer B (last, right)
    assert metrics["acc"] == 1.0 and metrics["acc/colour"] == 1.0 and metrics["acc/shape"] == 1.0
    items[2].answer = "A"  # now the oracle's last-option guess is wrong there
    metrics, records = score_items(Oracle(items), items)
    assert metrics["acc/shape"] == 0.5 and metrics["acc"] == 0.75 and metrics["n_scored"] == 4
    assert metrics["chance"] == pytest.approx((1 / 4 + 1 / 3 + 1 / 2 + 1 / 2) / 4)
    r = records[0]
    assert r["prediction"] == "A" and r["correct"] and sum(r["p_letters"].values()) == pytest.approx(1.0)


def test_score_with_a_real_tiny_model(tsv, tmp_path):
    """The runner scores letters with one forward pass; a random model gives some valid letter."""
    from metamorph.eval.inference import VPiTRunner
    from tests.unit.eval_fixtures import build_models, build_tokenizer, make_samples

    tok = build_tokenizer(make_samples(1), tmp_path / "tok")
    dirs = build_models(tok, tmp_path)
    runner = VPiTRunner.from_dirs(dirs["vpit_model"], dirs["vpit_model"], dirs["vision_encoder"])
    items = read_tsv(tsv)
    metrics, records = score_items(runner, items)
    assert metrics["n_scored"] == 4 and 0.0 <= metrics["acc"] <= 1.0
    for it, r in zip(items, records):
        assert r["prediction"] in it.options
    # the letter probabilities come from the model's next-token logits at the answer start
    logits = runner.option_logits(items[0].conversation(), items[0].images, list(items[0].options))
    best = max(range(4), key=lambda j: logits[j])
    assert records[0]["prediction"] == "ABCD"[best]
    # the one-pass logits agree with the KV-cached generation's first greedy token
    conv = items[0].conversation()
    logits_V = runner.next_token_logits(runner.prompt(conv, items[0].images))
    logits_V[runner.ids.image_start] = float("-inf")  # answer() bans drawing (max_images=0)
    first = runner.answer(conv, items[0].images, max_new_tokens=1).output.token_ids[0]
    assert first == int(logits_V.argmax())
