"""A self-contained HTML report: metric tables and sample grids with inline base64 PNG images.

    python -m metamorph.eval.report /tmp/report.html    # writes a small demo report

One file, no external assets or scripts (it opens from an MLflow artifact view or a laptop
offline). Every text cell is HTML-escaped; images are PNG data URIs, shown enlarged with
``image-rendering: pixelated`` so 32 px toy images stay readable.
"""

from __future__ import annotations

import base64
import html
import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px}td,th{border:1px solid #ddd;padding:3px 8px;font-size:13px;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.ok{background:#e7f6e7}td.bad{background:#fbe9e9}.note{color:#666;font-size:12px}
img.px{image-rendering:pixelated;border:1px solid #ccc;margin:1px}.cap{font-size:11px;color:#555}
"""

Cell = Union[str, float, int, None, Image.Image, Sequence[Image.Image], "Mark"]


@dataclass
class Mark:
    """A text cell coloured as right (``ok=True``) or wrong (``ok=False``)."""

    text: str
    ok: Optional[bool] = None


def png_data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img_tag(img: Image.Image, px: int = 96, title: str = "") -> str:
    w, h = img.size
    scale = px / max(w, h)
    return (f'<img class="px" src="{png_data_uri(img)}" width="{round(w * scale)}" height="{round(h * scale)}"'
            f' title="{html.escape(title)}" alt="{html.escape(title)}">')


def fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "" if v is None else str(v)


class Report:
    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.subtitle = subtitle
        self.blocks: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, note: bool = False) -> None:
        cls = ' class="note"' if note else ""
        self.blocks.append(f"<p{cls}>{html.escape(text)}</p>")

    def _cell(self, v: Cell, img_px: int) -> str:
        if isinstance(v, Mark):
            cls = "" if v.ok is None else (' class="ok"' if v.ok else ' class="bad"')
            return f"<td{cls}>{html.escape(v.text)}</td>"
        if isinstance(v, Image.Image):
            return f"<td>{img_tag(v, img_px)}</td>"
        if isinstance(v, (list, tuple)) and v and all(isinstance(x, Image.Image) for x in v):
            return "<td>" + "".join(img_tag(x, img_px) for x in v) + "</td>"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return f'<td class="num">{fmt(v)}</td>'
        return f"<td>{html.escape(fmt(v))}</td>"

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Cell]], title: str = "", note: str = "",
              img_px: int = 96) -> None:
        parts = []
        if title:
            parts.append(f"<h3>{html.escape(title)}</h3>")
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(self._cell(c, img_px) for c in r) + "</tr>")
        parts.append("</table>")
        if note:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        self.blocks.append("".join(parts))

    def metrics(self, values: dict[str, Any], title: str = "", note: str = "") -> None:
        self.table(["metric", "value"], [[k, v] for k, v in values.items()], title=title, note=note)

    def html(self) -> str:
        sub = f"<p class=\"note\">{html.escape(self.subtitle)}</p>" if self.subtitle else ""
        made = time.strftime("%Y-%m-%d %H:%M:%S")
        return (
            "<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head><body>"
            f"<h1>{html.escape(self.title)}</h1>{sub}<p class=\"note\">generated {made}</p>"
            + "\n".join(self.blocks)
            + "</body></html>"
        )

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".part")
        tmp.write_text(self.html(), encoding="utf-8")
        tmp.replace(path)
        return path


if __name__ == "__main__":
    r = Report("demo report", "two tables and a grid")
    r.metrics({"qa_acc": 0.91, "qa_majority": 0.31})
    red = Image.new("RGB", (32, 32), (220, 20, 20))
    r.table(["prompt", "generated", "reference"], [["a red square <b>", red, red]], title="t2i")
    r.table(["question", "answer", "truth"], [["What colour?", Mark("red", True), "red"]])
    print(r.write(sys.argv[1] if len(sys.argv) > 1 else "/tmp/report.html"))
