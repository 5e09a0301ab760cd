"""Mixture planning (ratios, caps, upsampling, seeded order) and the `mix` stage on hand-made curated dirs.

    python -m pytest tests/unit/test_mix.py -q
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from metamorph.data.imageproc import content_sha, signature
from metamorph.data.mix import FAMILIES, FamilyMix, Pick, interleave, plan_family
from metamorph.data.schema import ImageRef, Sample, Turn
from metamorph.data.shards import ShardWriter, iter_samples, read_index, write_index
from pipelines.testing import run_stage
from metamorph.data.spool import HASHES_FILE, hashes_schema
from stages.mix import MixConfig, MixStage
from tests.unit.curation_fixtures import png

IDS = [f"s-{i:03d}" for i in range(40)]


def test_ratio_and_cap():
    assert len(plan_family(IDS, FamilyMix(), 0)) == 40
    assert len(plan_family(IDS, FamilyMix(ratio=0.5), 0)) == 20
    assert len(plan_family(IDS, FamilyMix(max_samples=7), 0)) == 7
    assert len(plan_family(IDS, FamilyMix(ratio=0.5, max_samples=30), 0)) == 20
    assert plan_family(IDS, FamilyMix(max_samples=0), 0) == []
    assert plan_family([], FamilyMix(ratio=3.0), 0) == []


def test_upsampling_repeats_every_sample_with_distinct_ids():
    picks = plan_family(IDS[:10], FamilyMix(ratio=2.5), 0, "video")
    assert len(picks) == 25
    counts = {i: sum(p.id == i for p in picks) for i in IDS[:10]}
    assert sorted(counts.values()) == [2] * 5 + [3] * 5  # whole copies first, then a seeded part
    assert len({p.out_id for p in picks}) == 25


def test_selection_is_seeded_order_free_and_nested():
    a = plan_family(IDS, FamilyMix(max_samples=10), 0, "generation")
    assert a == plan_family(list(reversed(IDS)), FamilyMix(max_samples=10), 0, "generation")
    assert a != plan_family(IDS, FamilyMix(max_samples=10), 1, "generation")
    big = plan_family(IDS, FamilyMix(max_samples=30), 0, "generation")
    assert big[:10] == a  # the 5k mixture is inside the 200k one


def test_interleave_is_deterministic_and_mixes_families():
    picks = [Pick("understanding", i, 0) for i in IDS] + [Pick("generation", i, 0) for i in IDS]
    order = interleave(picks, 0)
    assert order == interleave(list(reversed(picks)), 0)
    assert sorted(order, key=lambda p: (p.family, p.id)) == sorted(picks, key=lambda p: (p.family, p.id))
    first_half = {p.family for p in order[:20]}
    assert first_half == {"understanding", "generation"}


def test_family_mix_validation():
    with pytest.raises(ValueError, match="ratio"):
        FamilyMix(ratio=-1)
    with pytest.raises(ValueError, match="max_samples"):
        FamilyMix(max_samples=-5)
    with pytest.raises(ValueError, match="unknown keys"):
        MixConfig(families={"audio": FamilyMix()})


# --- the stage -------------------------------------------------------------------------------------------

TASK = {"understanding": "image_qa", "generation": "t2i", "video": "frame_prediction", "visual_thinking": "visual_thinking", "image_edit": "image_edit"}


def _sample(family: str, sid: str, split: str) -> Sample:
    role = "prompt" if family == "understanding" else "response"
    conv = [Turn(role="user", content="<image>\nq" if role == "prompt" else "Draw it."), Turn(role="assistant", content="a" if role == "prompt" else "<image>")]
    return Sample(id=sid, source=family[:3], family=family, task=TASK[family], split=split, conversation=conv,
                  images=[ImageRef(ext="png", role=role)], meta={"n": sid})


def make_curated(root: Path, family: str, n_train: int, n_held: int, image_of=None, offset: int = 0) -> Path:
    """A curated dir like the curation stages write: shards, index, image hashes."""
    out = root / f"curated_{family}"
    image_of = image_of or (lambda k: png(offset + k))
    rows, hashes = [], []
    for split, ks in (("train", range(n_train)), ("heldout", range(n_train, n_train + n_held))):
        with ShardWriter(out, split, max_samples=7) as w:
            for k in ks:
                sid = f"{family[:3]}-{k:04d}"
                data = image_of(k)
                w.write(_sample(family, sid, split), [data])
                img = Image.open(io.BytesIO(data)).convert("RGB")
                ph, th = signature(img)
                hashes.append({"id": sid, "split": split, "image": 0, "sha": content_sha(data), "phash": ph, "thumb": th})
        rows += w.rows
    write_index(out, rows)
    pq.write_table(pa.Table.from_pylist(hashes, schema=hashes_schema()), out / HASHES_FILE)
    return out


@pytest.fixture
def curated(tmp_path):
    sizes = {"understanding": (30, 4), "generation": (20, 3), "video": (6, 2), "visual_thinking": (5, 1), "image_edit": (8, 2)}
    return {f"curated_{f}": make_curated(tmp_path / "in", f, *sizes[f], offset=100 * i) for i, f in enumerate(FAMILIES)}


def test_mix_stage_counts_heldout_and_readback(tmp_path, curated):
    cfg = MixConfig(families={
        "understanding": FamilyMix(),
        "generation": FamilyMix(max_samples=5),
        "video": FamilyMix(ratio=2.0),
        "visual_thinking": FamilyMix(ratio=0.4),
        "image_edit": FamilyMix(max_samples=0),
    })
    out, stats = run_stage(MixStage(), cfg, inputs=curated, root=tmp_path / "runs")
    want = {"understanding": 30, "generation": 5, "video": 12, "visual_thinking": 2, "image_edit": 0}
    assert {f: stats[f"selected/{f}"] for f in FAMILIES} == want
    mixture = out / "mixture"
    samples = list(iter_samples(mixture))  # webdataset reads it back
    assert len(samples) == sum(want.values()) == stats["samples_out"] == read_index(mixture).num_rows
    assert {s.split for s, _ in samples} == {"train"}
    assert sum(s.family == "video" for s, _ in samples) == 12 and sum("-rep1" in s.id for s, _ in samples) == 6
    assert stats["task/t2i"] == 5 and "task/image_edit" not in stats
    held = list(iter_samples(mixture / "heldout"))
    assert len(held) == 4 + 3 + 2 + 1 + 2 == stats["heldout_out"] and {s.split for s, _ in held} == {"heldout"}
    # interleaved: the first samples are not all one family
    assert len({s.family for s, _ in samples[:15]}) > 1


def test_mix_stage_is_deterministic(tmp_path, curated):
    cfg = MixConfig(families={f: FamilyMix(ratio=0.7) for f in FAMILIES})
    a, _ = run_stage(MixStage(), cfg, inputs=curated, root=tmp_path / "a")
    b, _ = run_stage(MixStage(), cfg, inputs=curated, root=tmp_path / "b")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    c, _ = run_stage(MixStage(), MixConfig(families=cfg.families, seed=1), inputs=curated, root=tmp_path / "c")
    assert (c / "mixture" / "shard-train-00000.tar").read_bytes() != (a / "mixture" / "shard-train-00000.tar").read_bytes()


def test_mix_cross_family_contamination(tmp_path):
    # generation's held-out picture k=20 reappears as understanding's train sample k=3
    gen = make_curated(tmp_path / "in", "generation", 20, 3)
    leaked = png(20)
    und = make_curated(tmp_path / "in", "understanding", 10, 0, image_of=lambda k: leaked if k == 3 else png(500 + k))
    inputs = {"curated_generation": gen, "curated_understanding": und}
    for i, f in enumerate(("video", "visual_thinking", "image_edit")):
        inputs[f"curated_{f}"] = make_curated(tmp_path / "in", f, 2, 1, offset=900 + 10 * i)
    out, stats = run_stage(MixStage(), MixConfig(), inputs=inputs, root=tmp_path / "runs")
    lines = [json.loads(line) for line in (out / "mixture" / "quarantine.jsonl").read_text().splitlines()]
    assert [(q["id"], q["reason"]) for q in lines] == [("und-0003", "contamination")]
    assert stats["selected/understanding"] == 9 and stats["quarantined"] == 1
    assert "und-0003" not in {s.id for s, _ in iter_samples(out / "mixture")}
