"""Small datasets laid out exactly as the public datasets publish them (our own content), each with
good records and one record per way a real file goes wrong.

    python -c "from tests.unit.published_fixtures import write_all; import tempfile; print(write_all(tempfile.mkdtemp()))"

Layouts follow the dataset cards and the official loaders: LLaVA-Instruct / Cambrian-7M (a JSON
array written with indent=4), LLaVA-Video-178K (JSONL, ``video`` key), Visual-CoT
(``metadata/<ds>_cot_train.jsonl`` + ``cot/<ds>/`` images, and ``viscot_363k.json``),
Something-Something-v2 (``labels/*.json`` + ``20bn-something-something-v2/<id>.webm``),
img2dataset (``00000.tar`` + ``00000.parquet`` + ``00000_stats.json``), InstructPix2Pix on the HF
hub (``data/train-00000-of-00001.parquet``), an edit JSONL beside image folders, and HowTo100M
caption CSVs (one per video, pandas index column first). ``write_all`` returns, per family, the
sources and what must come out: {family: (sources, good ids, {reason: count})}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from metamorph.data.readers import SourceConfig
from tests.unit.curation_fixtures import HF_IMAGE, encode, img2dataset_members, jpg, png, write_tar, write_video

BOX_PROMPT = " Please provide the bounding box coordinate of the region that can help you answer the question better."


def _json(path: Path, obj: Any, indent: int | None = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def understanding(root: Path) -> tuple[list[SourceConfig], set[str], dict[str, int]]:
    imgs = root / "llava" / "images"
    (imgs / "coco" / "train2017").mkdir(parents=True)
    for i in range(3):
        (imgs / "coco" / "train2017" / f"{i:012d}.jpg").write_bytes(jpg(40 + i, size=48))
    q = lambda text: {"from": "human", "value": text}  # noqa: E731
    a = lambda text: {"from": "gpt", "value": text}  # noqa: E731
    outside = root / "secret.png"
    outside.write_bytes(png(1))
    os.symlink(outside, imgs / "coco" / "link.png")  # resolves outside the image root
    os.mkfifo(imgs / "coco" / "pipe.png")  # never opened: reading a FIFO would block the worker
    llava = [
        {"id": "000000000000", "image": "coco/train2017/000000000000.jpg", "conversations": [q("<image>\nWhat colour is the box?"), a("It is red.")]},
        {"id": 17, "image": "coco/train2017/000000000001.jpg", "conversations": [q("What is in the corner?\n<image>"), a("A dot."), q("Which colour?"), a("Blue.")]},
        {"id": "two-images", "image": ["coco/train2017/000000000001.jpg", "coco/train2017/000000000002.jpg"],
         "conversations": [q("<image>\n<image>\nAre these the same?"), a("No.")]},
        {"id": "text-only", "conversations": [q("Name a primary colour."), a("Red.")]},
        {"id": {"nested": 1}, "image": "coco/train2017/000000000000.jpg", "conversations": [q("<image>\nx?"), a("y")]},
        {"id": "symlink-escape", "image": "coco/link.png", "conversations": [q("<image>\nx?"), a("y")]},
        {"id": "fifo", "image": "coco/pipe.png", "conversations": [q("<image>\nx?"), a("y")]},
        {"id": "null-value", "image": "coco/train2017/000000000000.jpg", "conversations": [q("<image>\nx?"), {"from": "gpt", "value": None}]},
        {"id": "long-answer", "image": "coco/train2017/000000000000.jpg", "conversations": [q("<image>\nx?"), a("y" * 20000)]},
    ]
    _json(root / "llava" / "llava_v1_5_mix_small.json", llava)
    vids = root / "video_178k" / "videos" / "academic"
    write_video(vids / "v_0001.mp4", n_frames=16, fps=8)
    write_video(vids / "v_0002.mp4", n_frames=16, fps=8)
    _jsonl(root / "video_178k" / "0_30_s_academic_v0_1_cap_processed.jsonl", [
        {"id": "v_0001", "video": "academic/v_0001.mp4", "data_source": "0_30_s_academic_v0_1",
         "conversations": [q("<image>\nWhich way does the red box move?"), a("To the right.")]},
        {"id": "v_0002", "video": "academic/v_0002.mp4", "data_source": "0_30_s_academic_v0_1",
         "conversations": [q("Describe the motion."), a("A box slides right."), q("What colour is it?"), a("Red.")]},
        {"id": "v_missing", "video": "academic/v_9999.mp4", "conversations": [q("<video>\nx?"), a("y")]},
    ])
    sources = [
        SourceConfig(name="llava", format="llava", path=str(root / "llava" / "llava_v1_5_mix_small.json"), image_root=str(imgs)),
        SourceConfig(name="lvid", format="llava", path=str(root / "video_178k"), video_root=str(root / "video_178k" / "videos")),
    ]
    good = {"llava-000000000000", "llava-17", "llava-two-images", "llava-text-only", "lvid-v_0001", "lvid-v_0002"}
    return sources, good, {"bad_id": 1, "unsafe_path": 1, "not_regular_file": 1, "null_value": 1, "text_too_long": 1, "video_missing": 1}


def visual_thinking(root: Path) -> tuple[list[SourceConfig], set[str], dict[str, int]]:
    cot = root / "viscot" / "cot"
    (cot / "gqa").mkdir(parents=True)
    (cot / "textvqa").mkdir(parents=True)
    wide = Image.new("RGB", (200, 100), (255, 255, 255))
    wide.paste((255, 0, 0), (20, 10, 90, 70))
    (cot / "gqa" / "wide.jpg").write_bytes(encode(wide, "PNG"))  # a PNG named .jpg decodes by content
    tall = Image.new("RGB", (100, 150), (255, 255, 255))
    tall.paste((0, 0, 255), (10, 20, 50, 100))
    (cot / "textvqa" / "tall.png").write_bytes(encode(tall))
    half = wide.resize((100, 50))  # the image as stored is half the size the metadata says
    (cot / "gqa" / "half.png").write_bytes(encode(half))
    meta = [
        # two boxes: their union [20, 10, 90, 70] is the region
        {"question_id": 0, "image": "wide.jpg", "question": "What colour is the box?", "answer": "Red.",
         "bboxs": [[20, 10, 60, 40], [50, 30, 90, 70]], "width": 200, "height": 100, "dataset": "gqa", "split": "train"},
        {"question_id": 1, "image": "half.png", "question": "What colour is the box?", "answer": "Red.",
         "bboxs": [[20, 10, 90, 70]], "width": 200, "height": 100, "dataset": "gqa", "split": "train"},
        {"question_id": 2, "image": "tall.png", "question": "What is written?", "answer": "Nothing.",
         "bboxs": [[10, 20, 50, 100]], "width": 100, "height": 150, "dataset": "textcap", "split": "train"},
        {"question_id": 3, "image": "wide.jpg", "question": "q?", "answer": "a", "bboxs": [], "width": 200, "height": 100, "dataset": "gqa", "split": "train"},
        {"question_id": 4, "image": "wide.jpg", "question": "q?", "answer": "a", "bboxs": [[150, 50, 260, 90]], "width": 200, "height": 100,
         "dataset": "gqa", "split": "train"},
        {"question_id": 5, "image": "wide.jpg", "question": float("nan"), "answer": "a", "bboxs": [[1, 1, 9, 9]], "width": 200, "height": 100,
         "dataset": "gqa", "split": "train"},
    ]
    _jsonl(root / "viscot" / "metadata" / "gqa_cot_train.jsonl", [json.dumps(m) for m in meta])  # NaN as JSON's NaN literal

    def conv(question: str, box: str, answer: str) -> list[dict[str, str]]:
        return [{"from": "human", "value": "<image>\n" + question + BOX_PROMPT}, {"from": "gpt", "value": box},
                {"from": "human", "value": "<image>"}, {"from": "gpt", "value": answer}]

    converted = [
        # normalised as the official conversion does: wide 200x100, union box [20, 10, 90, 70]:
        # y + (200 - 100) // 2, all / 200
        {"dataset": "gqa", "split": "train", "question_id": 0, "image": ["cot/gqa/wide.jpg", "cot/gqa/wide.jpg###[20, 10, 90, 70]"],
         "conversations": conv("Which colour does the large box have?", "[0.100, 0.300, 0.450, 0.600]", "Red.")},
        {"dataset": "gqa", "split": "train", "question_id": 1, "image": ["cot/gqa/wide.jpg"],
         "conversations": conv("Is the box red or blue?", "[0.100, 0.300, 0.450, 0.600]", "Red.")},
        # tall 100x150, box [10, 20, 50, 100]: x + (150 - 100) // 2, all / 150
        {"dataset": "textcap", "split": "train", "question_id": 2, "image": ["cot/textvqa/tall.png"],
         "conversations": conv("Is there text on the box?", "[0.233, 0.133, 0.500, 0.667]", "No.")},
        {"dataset": "gqa", "split": "train", "question_id": 3, "image": ["cot/gqa/wide.jpg"],
         "conversations": conv("q?", "the box is on the left", "a")},
    ]
    _json(root / "viscot" / "viscot_363k.json", converted)
    sources = [
        SourceConfig(name="vcot", format="viscot", path=str(root / "viscot" / "metadata"), image_root=str(cot)),
        SourceConfig(name="v363k", format="viscot", path=str(root / "viscot" / "viscot_363k.json"), image_root=str(root / "viscot")),
    ]
    good = {"vcot-0", "vcot-1", "vcot-2", "v363k-0", "v363k-1", "v363k-2"}
    return sources, good, {"bad_bbox": 2, "bbox_out_of_bounds": 1, "nan_value": 1}


def video(root: Path) -> tuple[list[SourceConfig], set[str], dict[str, int]]:
    ssv2 = root / "ssv2"
    vids = ssv2 / "20bn-something-something-v2"
    write_video(vids / "101.webm", n_frames=8, fps=8, codec="libvpx")
    write_video(vids / "102.mp4", n_frames=8, fps=8)
    _json(ssv2 / "labels" / "labels.json", {"Moving something from left to right": "0"})
    _json(ssv2 / "labels" / "train.json", [
        {"id": "101", "label": "moving box from left to right", "template": "Moving [something] from left to right", "placeholders": ["box"]},
        {"id": "102", "label": "moving cup from left to right", "template": "Moving [something] from left to right", "placeholders": ["cup"]},
        {"id": "103", "label": "moving pen from left to right", "template": "Moving [something] from left to right", "placeholders": ["pen"]},
        {"id": ["104"], "label": "x", "template": "x", "placeholders": []},
        {"id": "105", "label": "y" * 20000, "template": "x", "placeholders": []},
    ], indent=None)
    how = root / "howto100m"
    write_video(how / "videos" / "abc123.mp4", n_frames=24, fps=8)  # 3 s
    (how / "caption").mkdir(parents=True)
    (how / "caption" / "abc123.csv").write_text(",start,end,text\n0,0.0,1.5,pour the water\n1,1.5,3.0,\"stir, slowly\"\n")
    (how / "caption" / "zzz999.csv").write_text(",start,end,text\n0,0.0,1.0,no video for this one\n0,nan,2,bad time\n")
    (how / "caption" / "huge.csv").write_text("start,end,text\n0,1,\"" + "w" * 200_000 + "\"\n1,2,after the long field\n")
    sources = [
        SourceConfig(name="ssv2", format="ssv2", path=str(ssv2 / "labels"), video_root=str(vids)),
        SourceConfig(name="how", format="howto100m", path=str(how / "caption"), video_root=str(how / "videos")),
    ]
    good = {"ssv2-101", "ssv2-102", "how-abc123-0", "how-abc123-1.5"}
    return sources, good, {"video_missing": 3, "bad_id": 1, "text_too_long": 1, "malformed_csv": 1, "csv_field_too_long": 1}


def generation(root: Path) -> tuple[list[SourceConfig], set[str], dict[str, int]]:
    out = root / "img2dataset"
    members = img2dataset_members(range(3)) + img2dataset_members(range(3, 6))
    t = write_tar(out / "00000.tar", members)
    data = bytearray(t.read_bytes())
    at = data.find(b"000000003.jpg")  # the header of key 3's image: corrupt it in the middle of the tar
    data[at + 148 : at + 156] = b"9999999\x00"  # a checksum that cannot match
    t.write_bytes(bytes(data))
    pq.write_table(pa.table({"key": ["000000000"], "status": ["success"], "caption": ["sidecar, not a record"]}), out / "00000.parquet")
    _json(out / "00000_stats.json", {"count": 6, "successes": 6, "failed_to_download": 0})
    rows = [
        {"image": {"bytes": png(60), "path": "a.png"}, "caption": "a parquet box", "key": "k0"},
        {"image": {"bytes": png(61), "path": "b.png"}, "caption": None, "key": "k1"},
        {"image": {"bytes": png(62), "path": "c.png"}, "caption": "fine", "key": "k2"},
    ]
    schema = pa.schema([("image", HF_IMAGE), ("caption", pa.string()), ("key", pa.string())])
    (root / "hf").mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), root / "hf" / "train.parquet")
    nan_rows = pa.table({"image": pa.array([{"bytes": png(63), "path": None}, {"bytes": png(64), "path": None}], HF_IMAGE),
                         "caption": pa.array([float("nan"), 2.5]), "key": ["n0", "n1"]})
    pq.write_table(nan_rows, root / "hf" / "typed.parquet")
    sources = [
        SourceConfig(name="i2d", format="img2dataset", path=str(out)),
        SourceConfig(name="hf", format="parquet", path=str(root / "hf")),
    ]
    good = {"i2d-000000000", "i2d-000000001", "i2d-000000002", "i2d-000000004", "i2d-000000005", "hf-k0", "hf-k2"}
    # key 3 loses its image to the corrupt header: its .txt/.json still come, as image_missing
    return sources, good, {"tar_header_corrupt": 1, "image_missing": 1, "null_value": 1, "nan_value": 1, "wrong_type": 1}


def image_edit(root: Path) -> tuple[list[SourceConfig], set[str], dict[str, int]]:
    hub = root / "instructpix2pix" / "data"
    hub.mkdir(parents=True)
    schema = pa.schema([("original_prompt", pa.string()), ("original_image", HF_IMAGE), ("edit_prompt", pa.string()),
                        ("edited_prompt", pa.string()), ("edited_image", HF_IMAGE)])
    rows = [
        {"original_prompt": "a red box", "original_image": {"bytes": png(70), "path": None}, "edit_prompt": "make the box blue",
         "edited_prompt": "a blue box", "edited_image": {"bytes": png(71), "path": None}},
        {"original_prompt": "a box", "original_image": {"bytes": png(72, size=48), "path": None}, "edit_prompt": "move it left",
         "edited_prompt": "a box on the left", "edited_image": {"bytes": png(73, size=64), "path": None}},  # sizes differ: resized
        {"original_prompt": "x", "original_image": {"bytes": png(74), "path": None}, "edit_prompt": None,
         "edited_prompt": "y", "edited_image": {"bytes": png(75), "path": None}},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), hub / "train-00000-of-00001.parquet")
    ed = root / "edits"
    for sub in ("input", "output"):
        (ed / sub).mkdir(parents=True)
    for i in range(2):
        (ed / "input" / f"{i}.png").write_bytes(png(80 + i))
        (ed / "output" / f"{i}.png").write_bytes(png(90 + i))
    _jsonl(ed / "edits.jsonl", [
        {"uid": "e0", "input": "input/0.png", "edit": "turn the box green", "output": "output/0.png"},
        {"uid": "e1", "input": "input/1.png", "edit": "add a dot", "output": "output/1.png"},
        {"uid": "e2", "input": "input/1.png", "edit": "remove the dot", "output": "../outside.png"},
    ])
    sources = [
        SourceConfig(name="ip2p", format="instructpix2pix", path=str(hub)),
        SourceConfig(name="ej", format="edit_jsonl", path=str(ed / "edits.jsonl"),
                     fields={"id": "uid", "source": "input", "instruction": "edit", "target": "output"}),
    ]
    good = {"ip2p-train-00000-of-00001-00000000", "ip2p-train-00000-of-00001-00000001", "ej-e0", "ej-e1"}
    return sources, good, {"null_value": 1, "unsafe_path": 1}


FAMILIES = {"understanding": understanding, "generation": generation, "video": video, "visual_thinking": visual_thinking, "image_edit": image_edit}


def write_all(root: str | Path) -> dict[str, tuple[list[SourceConfig], set[str], dict[str, int]]]:
    root = Path(root)
    out = {}
    for family, fn in FAMILIES.items():
        (root / family).mkdir(parents=True, exist_ok=True)
        out[family] = fn(root / family)
    return out
