"""The HTML report: tables, escaping, inline PNG images that decode back.

    pytest -q tests/unit/test_eval_report.py
"""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

from PIL import Image

from metamorph.eval.report import Mark, Report


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[dict] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def test_report_renders_tables_and_images(tmp_path):
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    r = Report("eval <run>", "subtitle & more")
    r.metrics({"qa_acc": 0.9123456, "n": 3, "nan": float("nan")}, title="headline")
    r.table(["prompt", "generated", "frames", "verdict"],
            [["a <b>red</b> circle", red, [red, red], Mark("red", True)], ["x", None, "", Mark("blue", False)]],
            title="t2i", note="note <i>")
    path = r.write(tmp_path / "report.html")
    html = path.read_text()
    assert not (tmp_path / "report.html.part").exists()
    # user text is escaped, never markup
    assert "<b>red</b>" not in html and "&lt;b&gt;red&lt;/b&gt;" in html
    assert "eval &lt;run&gt;" in html
    p = _Collect()
    p.feed(html)
    assert p.tags.count("table") == 2 and p.tags.count("img") == 3
    # every image is an inline PNG that decodes to the original pixels
    for attrs in p.imgs:
        m = re.fullmatch(r"data:image/png;base64,(.+)", attrs["src"])
        assert m
        im = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
        assert im.size == (32, 32) and im.getpixel((5, 5)) == (220, 20, 20)
        assert attrs["width"] == "96"  # enlarged for viewing
    assert 'class="ok"' in html and 'class="bad"' in html
    assert "0.9123" in html and "http" not in html.replace("http-equiv", "")  # no external assets
