"""Every reader on a small dataset laid out as the public dataset publishes it, read and curated
in-process (the same fixtures go through the real stages on Ray in
tests/integration/test_curation_stages.py).

    python -m pytest tests/unit/test_published_layouts.py -q
"""

from __future__ import annotations

import collections
import io
import json

import numpy as np
import pytest
from PIL import Image

from metamorph.data.curate import QUARANTINE_REASONS, CurateConfig, process_record
from metamorph.data.readers import read_source
from metamorph.data.schema import Sample
from metamorph.data.video import VideoConfig
from tests.unit.published_fixtures import FAMILIES

CFG = CurateConfig(image_size=32, min_side=16, max_aspect=4.0)


def _curate(sources):
    rows = []
    for s in sources:
        for rec in read_source(s, records_per_unit=2):
            rows.append(process_record(rec, CFG, VideoConfig(fps=4.0, max_frames=8)))
    return rows


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_published_layout_good_out_bad_quarantined(tmp_path, family):
    sources, good, bad = FAMILIES[family](tmp_path)
    rows = _curate(sources)
    assert {r["id"] for r in rows if not r["reason"]} == good
    got = collections.Counter(r["reason"] for r in rows if r["reason"])
    assert dict(got) == bad, [(r["id"], r["reason"], r["detail"]) for r in rows if r["reason"]]
    assert set(got) <= set(QUARANTINE_REASONS)
    assert all(r["detail"] for r in rows if r["reason"])


def _samples(rows):
    return {r["id"]: (Sample.from_json(json.loads(r["sample"])), [Image.open(io.BytesIO(b)).convert("RGB") for b in r["images"]])
            for r in rows if not r["reason"]}


def test_visual_cot_boxes_union_scaled_and_unsquared(tmp_path):
    sources, _, _ = FAMILIES["visual_thinking"](tmp_path)
    got = _samples(_curate(sources))
    # the union of two boxes; the same region on an image stored at half the metadata's size;
    # the normalised text box of viscot_363k.json mapped back through the square padding
    assert got["vcot-0"][0].meta["bbox_xyxy"] == [20, 10, 90, 70]
    assert got["vcot-1"][0].meta["bbox_xyxy"] == [10, 5, 45, 35]
    assert got["v363k-0"][0].meta["bbox_xyxy"] == [20, 10, 90, 70]  # the pixel box after ###
    assert got["v363k-1"][0].meta["bbox_xyxy"] == [20, 10, 90, 70]  # inverted exactly
    assert got["v363k-2"][0].meta["bbox_xyxy"] == [10, 20, 50, 100]
    assert got["vcot-2"][0].meta["dataset"] == "textcap"  # read from cot/textvqa, as the release stores it
    for sid, colour in (("vcot-0", (255, 0, 0)), ("v363k-1", (255, 0, 0)), ("v363k-2", (0, 0, 255))):
        crop = np.asarray(got[sid][1][1]).reshape(-1, 3).astype(int)
        crop = crop[crop.sum(axis=1) > 100]  # the crop without its black padding
        assert (np.abs(crop - colour).max(axis=1) < 40).mean() > 0.9, sid  # the crop is the box
    assert got["v363k-2"][0].conversation[0].content.endswith("Think visually before you answer: Is there text on the box?")


def test_video_conversations_get_one_placeholder_per_frame(tmp_path):
    sources, _, _ = FAMILIES["understanding"](tmp_path)
    got = _samples(_curate(sources))
    s1, frames = got["lvid-v_0001"]
    assert s1.task == "video_qa" and len(frames) == 8 and s1.conversation[0].content == "<image>" * 8 + "\nWhich way does the red box move?"
    s2, _ = got["lvid-v_0002"]
    assert [t.role for t in s2.conversation] == ["user", "assistant", "user", "assistant"]
    assert s2.conversation[0].content.startswith("<image>" * 8 + "\nDescribe") and "<image>" not in s2.conversation[2].content
