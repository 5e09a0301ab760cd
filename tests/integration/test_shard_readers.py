"""Curated and mixture shards read with the usual WebDataset readers, default arguments:
`webdataset.WebDataset` and `ray.data.read_webdataset`. Every sample's record and images come
back, whatever its image count (text-only, one image, several, video frames).

    pytest -q tests/integration/test_shard_readers.py
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from metamorph.data.schema import IMAGE_PLACEHOLDER, ImageRef, Sample, Turn
from metamorph.data.shards import ShardWriter, iter_samples, list_shards, read_index, write_index

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FAMILIES = ("understanding", "generation", "video", "visual_thinking", "image_edit")


def _text_only_shards(out: Path, png: bytes) -> Path:
    """The toy world has no text-only records: two shards written by ``ShardWriter`` (the
    writer mix uses), one of text-only samples only (a Ray block whose image lists are all
    empty) and one mixing them with a three-image sample."""
    base = dict(source="t", family="understanding", task="image_qa", split="train", meta={})
    conv = [Turn(role="user", content="What is 2+2?"), Turn(role="assistant", content="4")]
    with ShardWriter(out, "train", max_samples=3) as w:
        for i in range(5):
            w.write(Sample(id=f"text-{i}", conversation=conv, images=[], **base), [])
        three = [Turn(role="user", content=" ".join([IMAGE_PLACEHOLDER] * 3) + " Same?"), Turn(role="assistant", content="yes")]
        w.write(Sample(id="three", conversation=three, images=[ImageRef(ext="png", role="prompt")] * 3, **base), [png] * 3)
    write_index(out, w.rows)
    return out


def test_curated_shards_read_with_webdataset_and_ray_defaults(smoke_run, ray_session, tmp_path):
    ray = ray_session
    out = smoke_run["summary"].out_dirs
    dirs = [out[f"curate_{f}"] / f"curated_{f}" for f in FAMILIES]
    dirs += [out["mix"] / "mixture", out["mix"] / "mixture" / "heldout"]
    png = next(images for _, images in iter_samples(dirs[1]) if images)[0]
    dirs.append(_text_only_shards(tmp_path / "text_only", png))

    # what the writers put there, by shard key: the index row and our own reader's view
    want: dict[str, tuple[dict, list[bytes]]] = {}
    for d in dirs:
        index = {r["key"]: r for r in read_index(d).to_pylist()}
        for sample, images in iter_samples(d):
            assert index[sample.key]["n_images"] == len(images) == len(sample.images)
            want[f"{d}:{sample.key}"] = (sample.to_json(), images)
        assert len(index) == sum(1 for k in want if k.startswith(f"{d}:"))
    counts = {len(images) for _, images in want.values()}
    assert 0 in counts and 1 in counts and max(counts) >= 3, counts  # text-only, single, several/frames

    paths = [str(p) for d in dirs for p in list_shards(d)]
    url_dir = {str(p): str(d) for d in dirs for p in list_shards(d)}

    # webdataset, no decoding: the raw members, two per sample
    seen = 0
    for rec in wds.WebDataset(paths, shardshuffle=False, empty_check=False):
        record, images = want[f"{url_dir[rec['__url__']]}:{rec['__key__']}"]
        assert set(rec) - {"__key__", "__url__", "__local_path__"} == {"json", "images.mp"}
        assert json.loads(rec["json"]) == record
        seen += 1
    assert seen == len(want)
    # webdataset's own decoders (`.decode()`) unpack the images member to the list of PNGs
    first = next(iter(wds.WebDataset(paths[:1], shardshuffle=False, empty_check=False).decode()))
    assert isinstance(first["images.mp"]["images"], list)

    # Ray Data, default arguments, every shard of every family in one dataset: one schema for all
    ds = ray.data.read_webdataset(paths).materialize()
    # Arrow-native columns in every block (no fallback to pickled Python objects)
    types = {str(ray.get(ref).schema.field("images.mp").type) for ref in ds.to_arrow_refs()}
    assert types == {"struct<images: list<item: binary>>"}, types
    rows = ds.take_all()
    assert len(rows) == len(want)
    for row in rows:
        record, images = want[f"{url_dir[row['__url__']]}:{row['__key__']}"]
        got = row["images.mp"]["images"]
        assert [bytes(b) for b in got] == images, row["__key__"]
        assert {k: row["json"][k] for k in ("id", "task", "split", "source")} == {k: record[k] for k in ("id", "task", "split", "source")}
        assert [t["content"] for t in row["json"]["conversation"]] == [t["content"] for t in record["conversation"]]
        assert [(r["ext"], r["role"]) for r in row["json"]["images"]] == [(r["ext"], r["role"]) for r in record["images"]]
    # the images are the lossless PNGs the stages wrote
    for record, images in want.values():
        for ref, b in zip(record["images"], images):
            img = Image.open(io.BytesIO(b))
            assert img.format == "PNG" and ref["ext"] == "png" and img.size[0] == img.size[1] > 0
