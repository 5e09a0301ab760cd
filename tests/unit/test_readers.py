"""Each upstream reader on its format variants and its malformed inputs (no Ray, no decoding).

    python -m pytest tests/unit/test_readers.py -q
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from metamorph.data.readers import READERS, SourceConfig, read_source
from metamorph.data.readers.base import jsonl_units
from tests.unit.curation_fixtures import (
    hf_image,
    img2dataset_members,
    jpg,
    png,
    symlink_member,
    write_caption_parquet,
    write_edit_parquet,
    write_jsonl,
    write_tar,
)


def src(fmt: str, path, **kw) -> SourceConfig:
    return SourceConfig(name="s", format=fmt, path=str(path), **kw)


def by_rid(records):
    return {r.rid: r for r in records}


def reasons(records):
    return sorted(r.reason for r in records if r.reason)


# --- llava ---------------------------------------------------------------------------------------


LLAVA_GOOD = [
    {"id": "one", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Red."}], "meta": {"truth": "red"}},
    {"id": "two", "image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image><image>\nSame?"}, {"from": "gpt", "value": "No."}]},
    {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
]


def test_llava_jsonl_single_multi_and_text_only(tmp_path):
    f = write_jsonl(tmp_path / "ann" / "llava.jsonl", LLAVA_GOOD)
    recs = by_rid(read_source(src("llava", f, image_root=str(tmp_path / "imgs"))))
    assert set(recs) == {"one", "two", "text"}
    assert recs["one"].payload["images"] == [{"path": str(tmp_path / "imgs" / "a.png"), "root": str(tmp_path / "imgs")}]
    assert recs["one"].payload["meta"] == {"truth": "red"}
    assert [i["path"] for i in recs["two"].payload["images"]] == [str(tmp_path / "imgs" / n) for n in ("a.png", "b.png")]
    assert recs["text"].payload["images"] == []
    assert all(not r.reason for r in recs.values())


def test_llava_default_image_root_is_annotation_dir(tmp_path):
    f = write_jsonl(tmp_path / "ann" / "llava.jsonl", LLAVA_GOOD[:1])
    (rec,) = read_source(src("llava", f))
    assert rec.payload["images"][0]["path"] == str(tmp_path / "ann" / "a.png")


def test_llava_json_array_equals_jsonl(tmp_path):
    a = tmp_path / "llava.json"
    a.write_text(json.dumps(LLAVA_GOOD))
    j = write_jsonl(tmp_path / "llava.jsonl", LLAVA_GOOD)
    ra = [r.payload for r in read_source(src("llava", a))]
    rj = [r.payload for r in read_source(src("llava", j))]
    assert ra == rj and len(ra) == 3


def test_llava_directory_reads_both_kinds(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.json").write_text(json.dumps(LLAVA_GOOD[:1]))
    write_jsonl(tmp_path / "d" / "y.jsonl", LLAVA_GOOD[1:])
    assert len(list(read_source(src("llava", tmp_path / "d")))) == 3


def test_llava_bad_lines_each_quarantined(tmp_path):
    lines = [
        LLAVA_GOOD[0],
        b'{"id": "broken", "conversations": [',  # malformed JSON
        b'{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9"}]}',  # not UTF-8
        b"[1, 2]",  # JSON, not an object
        b"",  # a blank line is not a record
        {"conversations": [{"from": "human", "value": "x"}]},  # no id
        {"id": "esc", "image": "../../etc/passwd", "conversations": LLAVA_GOOD[0]["conversations"]},
        {"id": "abs", "image": "/etc/passwd", "conversations": LLAVA_GOOD[0]["conversations"]},
        b'{"id": "sur", "conversations": [{"from": "human", "value": "\\udc80"}, {"from": "gpt", "value": "x"}]}',
    ]
    recs = list(read_source(src("llava", write_jsonl(tmp_path / "l.jsonl", lines))))
    assert len(recs) == 8
    assert reasons(recs) == sorted(["malformed_json", "non_utf8_text", "malformed_json", "missing_field", "unsafe_path", "unsafe_path", "non_utf8_text"])
    # line numbers survive for humans reading the quarantine file
    assert {r.locator for r in recs if r.reason == "non_utf8_text"} >= {"l.jsonl:3"}


def test_llava_malformed_array_keeps_what_precedes_and_counts_the_rest(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text('[{"id": 1}, ')
    first, rest = read_source(src("llava", f))
    assert first.rid == "1" and first.reason == "missing_field"  # no conversations
    assert rest.reason == "malformed_json" and rest.locator == "bad.json@12"
    f.write_text('{"id": 1}')
    (rec,) = read_source(src("llava", f))
    assert rec.reason == "malformed_json"


def test_jsonl_units_split_without_losing_lines(tmp_path):
    rows = [dict(LLAVA_GOOD[0], id=f"r{i}") for i in range(7)]
    f = write_jsonl(tmp_path / "l.jsonl", rows)
    units = jsonl_units(f, 3)
    assert len(units) == 3
    recs = list(read_source(src("llava", f), records_per_unit=3))
    assert [r.rid for r in recs] == [f"r{i}" for i in range(7)]
    assert [r.locator for r in recs] == [f"l.jsonl:{i + 1}" for i in range(7)]
    assert len({r.order for r in recs}) == 7


# --- videoqa / viscot --------------------------------------------------------------------------------


def test_videoqa(tmp_path):
    f = write_jsonl(tmp_path / "v.jsonl", [
        {"id": "v1", "video": "v1.mp4", "question": "Which way?", "answer": "left", "meta": {"d": "left"}},
        {"id": "v2", "video": "v2.webm", "answer": "left"},
    ])
    recs = by_rid(read_source(src("videoqa", f, video_root=str(tmp_path / "vids"))))
    assert recs["v1"].payload["video"] == {"path": str(tmp_path / "vids" / "v1.mp4"), "root": str(tmp_path / "vids")}
    assert recs["v1"].kind == "videoqa" and recs["v1"].payload["meta"] == {"d": "left"}
    assert recs["v2"].reason == "missing_field"


@pytest.mark.parametrize("fmt", ["xyxy", "xywh"])
def test_viscot_bbox_format_is_passed_not_guessed(tmp_path, fmt):
    f = write_jsonl(tmp_path / "vc.jsonl", [
        {"question_id": 7, "image": "x.png", "question": "What shape?", "answer": "circle", "bbox": [1, 2, 10, 12]},
        {"question_id": 8, "image": "x.png", "question": "q", "answer": "a", "bbox": [1, 2, 3]},
        {"question_id": 9, "image": "x.png", "question": "q", "answer": "a", "bbox": "1,2,3,4"},
    ])
    recs = by_rid(read_source(src("viscot", f, bbox_format=fmt)))
    assert recs["7"].payload["bboxes"] == [[1.0, 2.0, 10.0, 12.0]] and recs["7"].payload["bbox_format"] == fmt
    assert recs["8"].reason == recs["9"].reason == "bad_bbox"


def test_source_config_rejects_unknown_bbox_format():
    with pytest.raises(ValueError, match="bbox_format"):
        SourceConfig(name="s", format="viscot", path="x", bbox_format="cxcywh")


# --- img2dataset tars ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_img2dataset_image_formats(tmp_path, ext):
    write_tar(tmp_path / "g" / "00000.tar", img2dataset_members(range(3), ext=ext))
    recs = list(read_source(src("img2dataset", tmp_path / "g")))
    assert [r.rid for r in recs] == ["000000000", "000000001", "000000002"]
    assert all(not r.reason and len(r.blobs) == 1 and r.payload["caption"].startswith("a coloured box") for r in recs)


def test_img2dataset_caption_from_json_when_no_txt(tmp_path):
    members = [(n, d) for n, d in img2dataset_members([0]) if not n.endswith(".txt")]
    write_tar(tmp_path / "00000.tar", members)
    (rec,) = read_source(src("img2dataset", tmp_path / "00000.tar"))
    assert rec.payload["caption"] == "a coloured box number 0"


def test_img2dataset_unsafe_members_rejected_good_kept(tmp_path):
    members = img2dataset_members([0]) + [
        ("../evil.jpg", jpg(1)),
        ("/abs/evil.jpg", jpg(2)),
        symlink_member("link.jpg", "/etc/passwd"),
    ] + img2dataset_members([3])
    write_tar(tmp_path / "00000.tar", members)
    recs = list(read_source(src("img2dataset", tmp_path / "00000.tar")))
    assert reasons(recs) == ["unsafe_tar_member"] * 3
    assert sorted(r.rid for r in recs if not r.reason) == ["000000000", "000000003"]
    assert not (tmp_path.parent / "evil.jpg").exists()


def test_img2dataset_truncated_mid_member(tmp_path):
    f = write_tar(tmp_path / "00000.tar", img2dataset_members(range(4)))
    data = f.read_bytes()
    # cut inside the third key's image: keys 0 and 1 are complete
    cut = data.find(b"000000002.jpg") + 512 + 100
    f.write_bytes(data[:cut])
    recs = list(read_source(src("img2dataset", f)))
    assert [r.rid for r in recs if not r.reason] == ["000000000", "000000001"]
    assert reasons(recs) == ["truncated_tar"]


def test_img2dataset_truncated_at_member_boundary(tmp_path):
    f = write_tar(tmp_path / "00000.tar", img2dataset_members(range(2)))
    with tarfile.open(f) as t:
        last = t.getmembers()[-1]
    f.write_bytes(f.read_bytes()[: last.offset_data + 512])  # last member complete, end blocks gone
    recs = list(read_source(src("img2dataset", f)))
    assert [r.rid for r in recs if not r.reason] == ["000000000"]
    assert reasons(recs) == ["truncated_tar"]


def test_img2dataset_garbage_file_is_one_record(tmp_path):
    f = tmp_path / "00000.tar"
    f.write_bytes(b"this is not a tar at all" * 10)
    (rec,) = read_source(src("img2dataset", f))
    assert rec.reason == "truncated_tar"


def test_img2dataset_bad_members(tmp_path):
    members = [
        ("000000000.txt", b"caption without image"),
        ("000000001.jpg", jpg(1)), ("000000001.txt", b"caf\xe9 au lait"),
        ("000000002.jpg", jpg(2)), ("000000002.json", b"{not json"),
        ("000000003.jpg", jpg(3)), ("000000003.txt", b"fine"),
    ]
    write_tar(tmp_path / "00000.tar", members)
    recs = by_rid(read_source(src("img2dataset", tmp_path / "00000.tar")))
    assert recs["000000000"].reason == "image_missing"
    assert recs["000000001"].reason == "non_utf8_text"
    assert recs["000000002"].reason == "malformed_json"
    assert recs["000000003"].reason == ""


# --- parquet / instructpix2pix -------------------------------------------------------------------------


@pytest.mark.parametrize("binary_image,text_col", [(False, "caption"), (True, "text")])
def test_parquet_image_struct_or_binary(tmp_path, binary_image, text_col):
    rows = [{"image": png(i) if binary_image else hf_image(png(i)), "caption": f"box {i}"} for i in range(5)]
    f = write_caption_parquet(tmp_path / "p.parquet", rows, binary_image=binary_image, text_col=text_col, row_group_size=2)
    units = READERS["parquet"].plan(src("parquet", f), 256)
    assert len(units) == 3  # one per row group
    recs = list(read_source(src("parquet", f)))
    assert [r.rid for r in recs] == [f"p-{i:08d}" for i in range(5)]
    assert [r.payload["caption"] for r in recs] == [f"box {i}" for i in range(5)]
    assert all(len(r.blobs) == 1 for r in recs)


def test_parquet_image_by_path_and_missing(tmp_path):
    rows = [{"image": hf_image(None, "pics/a.png"), "caption": "x"}, {"image": hf_image(None, None), "caption": "y"}]
    f = write_caption_parquet(tmp_path / "p.parquet", rows)
    a, b = read_source(src("parquet", f))
    assert a.payload["image"] == {"path": str(tmp_path / "pics" / "a.png"), "root": str(tmp_path)}
    assert b.reason == "image_missing"


def test_instructpix2pix(tmp_path):
    f = write_edit_parquet(tmp_path / "e" / "train-00000.parquet", [
        {"original_image": hf_image(png(0)), "edit_prompt": "make it blue", "edited_image": hf_image(png(1))},
        {"original_image": hf_image(png(0)), "edit_prompt": "x", "edited_image": hf_image(None)},
    ])
    a, b = read_source(src("instructpix2pix", tmp_path / "e"))
    assert a.kind == "edit" and a.payload["edit_prompt"] == "make it blue" and len(a.blobs) == 2
    assert a.payload["original"] == {"blob": 0} and a.payload["edited"] == {"blob": 1} and a.payload["meta"] == {"k": 0}
    assert b.reason == "image_missing"
    assert f.exists()


# --- ssv2 / howto100m ------------------------------------------------------------------------------------


def test_ssv2_labels_and_templates(tmp_path):
    labels = tmp_path / "video" / "labels" / "train.json"
    labels.parent.mkdir(parents=True)
    (tmp_path / "video" / "labels" / "labels.json").write_text(json.dumps({"Moving [something] up": "0"}))
    labels.write_text(json.dumps([
        {"id": "17", "label": "Moving circle from left to right", "template": "Moving [something] from left to right", "placeholders": ["circle"]},
        {"id": 18, "template": "Putting [something] onto [something]", "placeholders": ["cup", "table"]},
        {"label": "no id"},
    ]))
    recs = list(read_source(src("ssv2", tmp_path / "video" / "labels")))  # dir: labels.json skipped
    ok = by_rid(r for r in recs if not r.reason)
    assert ok["17"].payload["label"] == "Moving circle from left to right"
    assert ok["18"].payload["label"] == "Putting cup onto table"
    vids = tmp_path / "video" / "videos"
    assert ok["17"].payload["video"]["candidates"] == [str(vids / "17.webm"), str(vids / "17.mp4")]
    assert reasons(recs) == ["missing_field"]


def test_howto100m_csv(tmp_path):
    f = tmp_path / "captions.csv"
    f.write_bytes(
        b"video_id,start,end,text\n"
        b"abc,0.0,2.5,\"pour the water, slowly\"\n"
        b"abc,3,x,bad numbers\n"
        b"def,1,0,backwards\n"
        b"ghi,0,1,caf\xe9\n"
    )
    recs = list(read_source(src("howto100m", f, video_root=str(tmp_path / "v"))))
    ok = [r for r in recs if not r.reason]
    assert len(ok) == 1 and ok[0].rid == "abc-0" and ok[0].payload["label"] == "pour the water, slowly"
    assert ok[0].payload["start"] == 0.0 and ok[0].payload["end"] == 2.5
    assert ok[0].payload["video"]["candidates"][0] == os.path.join(str(tmp_path / "v"), "abc.mp4")
    assert reasons(recs) == ["malformed_csv", "malformed_csv", "non_utf8_text"]


# --- plans split big files; reading the parts yields what reading the whole file yields ------------------


def _same(r):
    return (r.rid, r.locator, r.kind, json.dumps(r.payload, sort_keys=True), r.blobs, r.reason, r.detail)


def _split_equals_whole(source, n_units_at_2):
    whole = list(read_source(source, records_per_unit=10**9))
    assert len(READERS[source.format].plan(source, 10**9)) == 1
    assert len(READERS[source.format].plan(source, 2)) == n_units_at_2
    for n in (1, 2, 3):
        parts = list(read_source(source, records_per_unit=n))
        assert [_same(r) for r in parts] == [_same(r) for r in whole]
        orders = [r.order for r in parts]
        assert orders == sorted(orders) and len(set(orders)) == len(orders)  # deterministic, unique
    return whole


def test_tar_split_into_member_ranges(tmp_path):
    members = img2dataset_members(range(3)) + [("../evil.txt", b"x")] + img2dataset_members([3])
    members += [(f"sub/{'L' * 120}00004.jpg", jpg(4)), (f"sub/{'L' * 120}00004.txt", b"long name")]  # extended headers
    members += [("00005.jpg", jpg(5)), ("00005.txt", b"x"), ("00005.json", b"not json")]
    f = tmp_path / "00000.tar"
    with tarfile.open(f, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    recs = _split_equals_whole(src("img2dataset", f), 3)
    assert reasons(recs) == ["malformed_json", "unsafe_tar_member"] and len(recs) == 7
    # ustar headers (prefix field, a directory) take the fast header scan; it agrees with tarfile's
    from metamorph.data.readers.img2dataset import _scan_headers, _scan_tarfile

    u = tmp_path / "ustar" / "00000.tar"
    u.parent.mkdir()
    with tarfile.open(u, "w", format=tarfile.USTAR_FORMAT) as tar:
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in img2dataset_members(range(2)) + [(f"{'p' * 90}/{'q' * 60}/00002.jpg", jpg(2)), (f"{'p' * 90}/{'q' * 60}/00002.txt", b"c")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    assert _scan_headers(u) == _scan_tarfile(u) and len(_scan_headers(u)[0]) == 9
    assert len(_split_equals_whole(src("img2dataset", u), 2)) == 3
    # a truncated tar is not split: its read reports the cut
    raw = f.read_bytes()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2])
    assert READERS["img2dataset"].plan(src("img2dataset", tmp_path / "cut.tar"), 2) == [{"file": str(tmp_path / "cut.tar")}]


def _variant_tars(root):
    """Tars mixing plain ustar members with every header kind the fast walk hands to tarfile."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        f = root / f"fmt{fmt}.tar"
        with tarfile.open(f, "w", format=fmt) as tar:
            d = tarfile.TarInfo("dir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            members = img2dataset_members(range(3)) + [("../evil.txt", b"x")] + img2dataset_members([3])
            if fmt != tarfile.USTAR_FORMAT:  # long names: GNU longname / pax headers mid-archive
                members += [(f"sub/{'L' * 120}00004.jpg", jpg(4)), (f"sub/{'L' * 120}00004.txt", b"long")]
            members += [(f"{'p' * 90}/{'q' * 60}/00005.jpg", jpg(5)), (f"{'p' * 90}/{'q' * 60}/00005.txt", b"prefix")]
            members += img2dataset_members([6, 7])
            for name, data in members:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            tar.addfile(symlink_member("00008.jpg", "/etc/passwd"))
            for name, data in img2dataset_members([9]):
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
        out.append(f)
    return out


def test_tar_fast_walk_equals_tarfile_on_damaged_tars(tmp_path):
    # the reader parses plain headers itself and gives tarfile the rest; on every variant and on
    # hundreds of damaged copies (cut anywhere, bytes overwritten, garbage appended) it must yield
    # what a tarfile-only walk yields, record for record and message for message
    import random

    from metamorph.data.readers import img2dataset

    def walk(path, fast, per_unit):
        s = src("img2dataset", path)
        units = img2dataset.plan(s, per_unit) if per_unit else [{"file": str(path)}]
        return [(r.order, *_same(r)) for i, u in enumerate(units) for r in img2dataset.read(s, u, i, fast=fast)]

    rng = random.Random(0)
    damaged = tmp_path / "damaged.tar"
    checked = 0
    for f in _variant_tars(tmp_path):
        raw = f.read_bytes()
        assert walk(f, True, None) == walk(f, False, None)
        assert walk(f, True, 2) == walk(f, False, 2) and len(img2dataset.plan(src("img2dataset", f), 2)) > 2
        for trial in range(120):
            data = bytearray(raw)
            kind = trial % 4
            if kind == 0:
                data = data[: rng.randrange(len(data))]
            elif kind == 1:  # a header byte: name, size, type, checksum, magic or prefix
                at = rng.randrange(len(data) // 512) * 512 + rng.choice([0, 5, 100, 125, 130, 140, 150, 156, 257, 345])
                data[at] = rng.randrange(256)
            elif kind == 2:
                at = rng.randrange(len(data))
                data[at : at + 16] = bytes(rng.randrange(256) for _ in range(16))[: len(data) - at]
            else:
                data = data[: rng.randrange(len(data) // 512) * 512] + bytes(rng.randrange(256) for _ in range(rng.choice([0, 300, 512, 1024])))
            damaged.write_bytes(bytes(data))
            assert walk(damaged, True, None) == walk(damaged, False, None), (f.name, trial)
            checked += 1
    assert checked == 360


def test_json_array_split_into_element_ranges(tmp_path):
    rows = [dict(LLAVA_GOOD[0], id=f"r{i}é") for i in range(5)] + [7, {"id": "x", "conversations": []}]
    f = tmp_path / "l.json"
    f.write_text(" [\n" + ",\n ".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + "\n] \n", encoding="utf-8")
    recs = _split_equals_whole(src("llava", f), 4)
    assert [r.locator for r in recs] == [f"l.json[{i}]" for i in range(7)]
    labels = tmp_path / "labels" / "train.json"
    labels.parent.mkdir()
    labels.write_text(json.dumps([{"id": str(i), "label": f"move {i}"} for i in range(4)] + [{"label": "no id"}]))
    assert reasons(_split_equals_whole(src("ssv2", labels), 3)) == ["missing_field"]


def test_csv_split_into_row_ranges(tmp_path):
    f = tmp_path / "c.csv"
    f.write_bytes(b"video_id,start,end,text\r\n" + b"".join(f'v{i},{i},{i + 1},"pour, {i}\nslowly"\r\n'.encode() for i in range(4))
                  + b"abc,3,x,bad\n\nghi,0,1,caf\xe9\n")
    recs = _split_equals_whole(src("howto100m", f), 4)
    assert reasons(recs) == ["malformed_csv", "non_utf8_text"]
    assert recs[-1].locator == "c.csv:12"  # header, 4 two-line rows, abc, a blank line, ghi


def test_parquet_row_group_split_into_row_ranges(tmp_path):
    rows = [{"image": hf_image(jpg(i)), "caption": f"c{i}"} for i in range(5)]
    f = write_caption_parquet(tmp_path / "p.parquet", rows)
    _split_equals_whole(src("parquet", f), 3)


# --- streaming JSON arrays, typed values, media containment ------------------------------------------------


def test_json_array_planned_in_chunks(tmp_path, monkeypatch):
    from metamorph.data.readers import base

    monkeypatch.setattr(base, "JSON_CHUNK", 7)  # every element, string and number spans chunk boundaries
    rows = [{"id": f"r{i}", "t": "ü€" * (i * 5), "n": 12345678901234 * i} for i in range(9)] + [123456789, "x", None]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(rows, indent=4, ensure_ascii=False), encoding="utf-8")
    for per in (1, 4, 100):
        units = base.json_array_units(f, per)
        got = [x for u in units for x in base.json_array_load(u)[1]]
        assert got == rows
        assert [u["first"] for u in units] == list(range(0, len(rows), per))
    f.write_bytes(b'[{"id": 1}, {"id": 2}, \xff{"id": 3}]')
    units = base.json_array_units(f, 1)
    assert [u.get("reason") for u in units] == [None, None, "non_utf8_text"] and units[-1]["first"] == 2


def test_big_json_array_never_held_whole(tmp_path):
    import tracemalloc

    from metamorph.data.readers import base

    f = tmp_path / "big.json"
    row = json.dumps({"id": "x", "conversations": [{"from": "human", "value": "v" * 900}]})
    with open(f, "w") as fh:
        fh.write("[" + ",\n".join([row] * 30000) + "]")  # ~28 MB
    tracemalloc.start()
    units = base.json_array_units(f, 1000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(units) == 30 and units[-1]["first"] == 29000
    assert peak < 8 * 2**20, peak  # a few chunks, not the 28 MB file


def test_null_nan_wrong_type_and_bad_ids(tmp_path):
    q = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    f = tmp_path / "l.jsonl"
    f.write_text("\n".join([
        json.dumps({"id": [1], "conversations": q}),
        json.dumps({"id": None, "conversations": q}),
        json.dumps({"id": 1.5, "conversations": q}),
        json.dumps({"conversations": q}),
        json.dumps({"id": "a", "conversations": [{"from": "human", "value": None}, q[1]]}),
        json.dumps({"id": "b", "conversations": [{"from": "human", "value": float("nan")}, q[1]]}),
        json.dumps({"id": "c", "conversations": [{"from": "human", "value": 7}, q[1]]}),
        json.dumps({"id": "d", "conversations": [{"from": "human", "value": "z" * 1_000_001}, q[1]]}),
        json.dumps({"id": 0, "conversations": q}),
    ]) + "\n")
    recs = list(read_source(src("llava", f)))
    assert [r.reason for r in recs] == ["bad_id", "bad_id", "bad_id", "missing_field", "null_value", "nan_value", "wrong_type", "text_too_long", ""]
    assert recs[-1].rid == "0"


def test_parquet_typed_cells(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.unit.curation_fixtures import HF_IMAGE

    img = {"bytes": png(0), "path": None}
    t = pa.table({"image": pa.array([img] * 4 + [None], HF_IMAGE), "caption": pa.array([float("nan"), float("inf"), None, 3.0, 1.0]),
                  "id": pa.array([{"a": 1}, {"a": 2}, {"a": 3}, {"a": 4}, {"a": 5}])})
    pq.write_table(t, tmp_path / "t.parquet")
    assert reasons(read_source(src("parquet", tmp_path / "t.parquet"))) == ["bad_id"] * 5
    pq.write_table(t.drop(["id"]), tmp_path / "t.parquet")
    recs = list(read_source(src("parquet", tmp_path / "t.parquet")))
    assert [r.reason for r in recs] == ["nan_value", "nan_value", "null_value", "wrong_type", "wrong_type"]
    assert not any("nan" == (r.payload.get("caption") or "").lower() for r in recs)


def test_csv_field_over_the_csv_limit_is_quarantined(tmp_path):
    import csv

    f = tmp_path / "c.csv"
    f.write_text("video_id,start,end,text\na,0,1,\"" + "w" * (csv.field_size_limit() + 10) + "\"\nb,0,1,fine\n")
    recs = list(read_source(src("howto100m", f)))
    assert [(r.rid, r.reason) for r in recs] == [("", "csv_field_too_long"), ("b-0", "")]


def test_media_containment_fifo_and_size_cap(tmp_path):
    from metamorph.data.readers.base import Reject, read_media

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.png").write_bytes(png(0))
    (tmp_path / "outside.png").write_bytes(png(1))
    os.symlink(tmp_path / "outside.png", root / "escape.png")
    os.symlink(root / "ok.png", root / "sub" / "inside.png")  # a link that stays inside is fine
    os.mkfifo(root / "fifo.png")
    linked_root = tmp_path / "linked"
    os.symlink(root, linked_root)  # a dataset root that is itself a symlink (another disk) is fine

    def why(name, root=root, cap=10**6):
        try:
            read_media({"path": str(root / name), "root": str(root)}, cap, "image")
            return ""
        except Reject as r:
            return r.reason

    assert why("ok.png") == why("sub/inside.png") == why("ok.png", root=linked_root) == ""
    assert why("escape.png") == "unsafe_path"
    assert why("fifo.png") == "not_regular_file"  # returns at once: a FIFO opened for reading would block
    assert why("sub") == "not_regular_file"
    assert why("nope.png") == "image_missing"
    assert why("ok.png", cap=10) == "file_too_large"


def test_tar_header_corrupt_mid_archive_reads_before_and_after(tmp_path):
    from metamorph.data.readers import img2dataset

    f = write_tar(tmp_path / "00000.tar", img2dataset_members(range(6)))
    data = bytearray(f.read_bytes())
    at = data.find(b"000000002.txt")
    data[at + 148 : at + 156] = b"0000000\x00"  # bad checksum on key 2's caption header
    f.write_bytes(bytes(data))
    for fast in (True, False):
        recs = list(img2dataset.read(src("img2dataset", f), {"file": str(f)}, 0, fast=fast))
        assert [(r.rid, r.reason) for r in recs] == [
            ("000000000", ""), ("000000001", ""), ("", "tar_header_corrupt"), ("000000002", ""),  # caption from its .json
            ("000000003", ""), ("000000004", ""), ("000000005", "")]
        assert recs[2].locator == f"00000.tar@{at}"


def test_fields_renamed_per_source_and_unknown_fields_refused(tmp_path):
    from metamorph.data.readers import check_source

    f = write_jsonl(tmp_path / "e.jsonl", [{"src": "a.png", "prompt": "make it red", "dst": "b.png"}])
    s = src("edit_jsonl", f, fields={"source": "src", "instruction": "prompt", "target": "dst"})
    (rec,) = read_source(s)
    assert rec.reason == "" and rec.payload["edit_prompt"] == "make it red" and rec.payload["edited"]["path"].endswith("b.png")
    assert rec.rid == "e.jsonl-1"
    with pytest.raises(ValueError, match="fields.*'target_img'"):
        check_source(src("edit_jsonl", f, fields={"target_img": "dst"}), "sources[0]")


def test_instructpix2pix_columns_renamed_for_other_hub_edit_sets(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.unit.curation_fixtures import HF_IMAGE

    t = pa.Table.from_pylist([{"img_id": "327726", "turn_index": 1, "source_img": {"bytes": png(0), "path": None},
                               "mask_img": {"bytes": png(9), "path": None}, "instruction": "let the box be green",
                               "target_img": {"bytes": png(1), "path": None}}],
                             schema=pa.schema([("img_id", pa.string()), ("turn_index", pa.int32()), ("source_img", HF_IMAGE),
                                               ("mask_img", HF_IMAGE), ("instruction", pa.string()), ("target_img", HF_IMAGE)]))
    pq.write_table(t, tmp_path / "train-00000-of-00001.parquet")
    s = src("instructpix2pix", tmp_path, fields={"source": "source_img", "instruction": "instruction", "target": "target_img"})
    (rec,) = read_source(s)
    assert rec.reason == "" and rec.payload["edit_prompt"] == "let the box be green" and rec.blobs == [png(0), png(1)]
    (rec,) = read_source(src("instructpix2pix", tmp_path))  # without the renames: the columns are missing
    assert rec.reason == "missing_field" and "original_image" in rec.detail


def test_every_reason_a_reader_or_curation_can_give_is_documented():
    import re
    from pathlib import Path

    from metamorph.data.curate import QUARANTINE_REASONS

    root = Path(__file__).resolve().parents[2] / "metamorph" / "data"
    files = [*(root / "readers").glob("*.py"), root / "curate.py", root / "imageproc.py", root / "video.py"]
    used = {m for f in files for m in re.findall(r'Reject\(\s*"([a-z_]+)"', f.read_text())}
    used |= {m for f in files for m in re.findall(r'rejected\([^)]*?"([a-z_]+)"', f.read_text())}
    used |= {"missing", "image_missing", "video_missing"} - {"missing"}  # check_media's ``missing`` argument
    assert len(used) > 25 and used <= set(QUARANTINE_REASONS), used - set(QUARANTINE_REASONS)
