"""The sweep plot: one panel per metric, a curve per series value, cells without a value skipped."""

from __future__ import annotations

import pytest

from pipelines.config import ConfigError
from pipelines.sweep import plot, plot_metrics

TABLE = [
    {"n": n, "u": u, "acc": 0.1 * n / 100 + u, "top1": None if (n, u) == (400, 1.0) else 0.01 * n / 100, "status": "finished"}
    for n in (100, 400, 1600)
    for u in (0.0, 1.0)
]


def test_plot_one_panel_per_metric(tmp_path):
    spec = {"x": "n", "y": ["acc", "top1"], "series": "u", "y_label": ["accuracy", "top-1"], "title": "t"}
    assert plot_metrics(spec) == ["acc", "top1"]
    out = tmp_path / "p.png"
    plot(TABLE, spec, out)
    from PIL import Image

    w, h = Image.open(out).size
    assert w > 1.5 * h  # two panels side by side

    single = tmp_path / "s.png"
    plot(TABLE, {"x": "n", "y": "acc", "series": "u"}, single)
    sw, sh = Image.open(single).size
    assert sw < 1.6 * sh and plot_metrics({"y": "acc"}) == ["acc"]


def test_plot_label_count_must_match(tmp_path):
    with pytest.raises(ConfigError, match="y_label"):
        plot(TABLE, {"x": "n", "y": ["acc", "top1"], "y_label": ["only one"]}, tmp_path / "p.png")


def test_plot_series_over_two_keys_draws_a_curve_per_combination(tmp_path, monkeypatch):
    """The gen-data-scaling sweep's equal-compute / equal-exposure cells: series = [ratio, max_steps]."""
    import matplotlib.axes

    table = [dict(r, steps=s) for r in TABLE for s in (1200, 0)]
    labels_seen: list[str] = []
    orig = matplotlib.axes.Axes.plot

    def spy(self, *a, **kw):
        labels_seen.append(kw.get("label"))
        return orig(self, *a, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    plot(table, {"x": "n", "y": "acc", "series": ["u", "steps"], "series_labels": {"1.0/0": "co-trained, equal exposure"}},
         tmp_path / "p.png")
    assert len(labels_seen) == 4 and "co-trained, equal exposure" in labels_seen and "u/steps=0.0/1200" in labels_seen
