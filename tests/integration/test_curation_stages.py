"""The five curation stages and `mix` on local Ray: toy world end to end, and every bad input.

    python -m pytest tests/integration/test_curation_stages.py -q -m integration
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from metamorph.data.readers import SourceConfig
from metamorph.data.shards import iter_samples, read_index
from metamorph.world import WorldConfig, write_world
from pipelines.testing import run_stage
from stages.curate_generation import CurateGeneration, CurateGenerationConfig
from stages.curate_image_edit import CurateImageEdit, CurateImageEditConfig
from stages.curate_understanding import CurateUnderstanding, CurateUnderstandingConfig
from stages.curate_video import CurateVideo, CurateVideoConfig
from stages.curate_visual_thinking import CurateVisualThinking, CurateVisualThinkingConfig
from stages.mix import MixConfig, MixStage
from tests.unit.curation_fixtures import (
    bomb_png,
    hf_image,
    img2dataset_members,
    jpg,
    png,
    truncated,
    write_caption_parquet,
    write_edit_parquet,
    write_jsonl,
    write_tar,
    write_video,
)

STAGES = [CurateUnderstanding, CurateGeneration, CurateVideo, CurateVisualThinking, CurateImageEdit]
SMALL_WORLD = dict(n_understanding=40, n_videoqa=6, n_generation=40, n_video=8, n_visual_thinking=12, n_image_edit=12, shard_size=25)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    write_world(out, WorldConfig(**SMALL_WORLD), seed=0)
    return out


def _check_counts(stats: dict) -> None:
    reasons = sum(v for k, v in stats.items() if k.startswith("quarantine/"))
    assert stats["samples_out"] + stats["quarantined"] == stats["records_in"]
    assert reasons == stats["quarantined"]
    assert stats["split/train"] + stats["split/heldout"] == stats["samples_out"]


def _quarantine(out: Path, artifact: str) -> list[dict]:
    return [json.loads(line) for line in (out / artifact / "quarantine.jsonl").read_text().splitlines()]


def test_fingerprint_tracks_external_files(tmp_path):
    f = write_jsonl(tmp_path / "ann" / "llava.jsonl", [{"id": "a"}])
    cfg = CurateUnderstandingConfig(sources=[SourceConfig(name="x", format="llava", path=str(tmp_path / "ann"))])
    before = CurateUnderstanding().fingerprint(cfg)
    assert before["x"][0][0] == str(f)
    f.write_text('{"id": "a"}\n{"id": "b"}\n')
    assert CurateUnderstanding().fingerprint(cfg) != before
    assert CurateUnderstanding().fingerprint(CurateUnderstandingConfig()) == {}  # world sources: keyed upstream


def test_input_artifacts_follow_sources():
    assert CurateGeneration().input_artifacts(CurateGenerationConfig()) == ("world",)
    local = CurateGenerationConfig(sources=[SourceConfig(name="laion", format="parquet", path="/data/laion")])
    assert CurateGeneration().input_artifacts(local) == ()
    with pytest.raises(ValueError, match="format"):
        CurateGeneration().validate(CurateGenerationConfig(sources=[SourceConfig(name="x", format="llava", path="world:u.jsonl")]))
    with pytest.raises(ValueError, match="does not exist"):
        CurateGeneration().validate(CurateGenerationConfig(sources=[SourceConfig(name="x", format="parquet", path="/nonexistent/p")]))


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_world_through_curation_and_mix(ray_session, world, tmp_path):
    outs = {}
    for S in STAGES:
        cfg = S.config_cls(records_per_task=8, heldout_fraction=0.2)
        out, stats = run_stage(S(), cfg, inputs={"world": world}, root=tmp_path / "runs")
        _check_counts(stats)
        artifact = S.outputs[0]
        d = out / artifact
        index = read_index(d)
        samples = list(iter_samples(d))
        assert len(samples) == index.num_rows == stats["samples_out"] > 0
        assert stats["split/heldout"] > 0
        assert not [q for q in _quarantine(out, artifact) if q["reason"] == "processing_error"]
        for s, images in samples:
            s.validate()
            assert len(images) == len(s.images) and all(b[:4] == b"\x89PNG" for b in images)
        hashes = pq.read_table(d / "image_hashes.parquet")
        assert hashes.num_rows == stats["images_out"]
        outs[artifact] = d
    # the toy world is clean: only the guard may drop anything (duplicates/near copies)
    und = {s.task for s, _ in iter_samples(outs["curated_understanding"])}
    assert und == {"image_qa", "video_qa"}
    mix_out, mix_stats = run_stage(MixStage(), MixConfig(), inputs=outs, root=tmp_path / "runs")
    mixture = mix_out / "mixture"
    assert len(list(iter_samples(mixture))) == mix_stats["samples_out"] == read_index(mixture).num_rows
    assert {s.task for s, _ in iter_samples(mixture)} == {"image_qa", "video_qa", "t2i", "frame_prediction", "visual_thinking", "image_edit"}
    assert mix_stats["heldout_out"] == sum(read_index(d).filter(pq_split(read_index(d), "heldout")).num_rows for d in outs.values())


def pq_split(table, split):
    import pyarrow.compute as pc

    return pc.equal(table["split"], split)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_one_big_file_is_processed_by_many_tasks(ray_session, tmp_path, capsys):
    from metamorph.data.readers import READERS
    from stages._curation import processing_dataset

    from tests.unit.curation_fixtures import img2dataset_members, write_tar

    cfg = CurateGenerationConfig(records_per_task=8)
    src = SourceConfig(name="x", format="img2dataset", path=str(write_tar(tmp_path / "00000.tar", img2dataset_members(range(20)))))
    # the plan cuts one tar into member ranges of records_per_task keys: one task each
    assert len(READERS["img2dataset"].plan(src, cfg.records_per_task)) == 3
    ds = processing_dataset([{"source": 0, "unit": "{}", "unit_idx": 0}], [src], cfg)
    capsys.readouterr()
    ds.explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    # read and process fused in one operator: raw image bytes never travel between tasks
    assert "TaskPoolMapOperator[MapBatches(read_process)]" in optimized


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_rerun_writes_identical_files(ray_session, world, tmp_path):
    cfgs = [CurateGenerationConfig(records_per_task=8), CurateGenerationConfig(records_per_task=13, cpus_per_task=0.5)]
    dirs = [run_stage(CurateGeneration(), c, inputs={"world": world}, root=tmp_path / f"r{i}")[0] for i, c in enumerate(cfgs)]
    files = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*") if p.is_file())
    assert any(f.suffix == ".tar" for f in files)
    assert files == sorted(p.relative_to(dirs[1]) for p in dirs[1].rglob("*") if p.is_file())
    for f in files:  # operational knobs (task size, CPUs) change scheduling, never the bytes
        assert (dirs[0] / f).read_bytes() == (dirs[1] / f).read_bytes(), f


# --- every bad input of the issue, through the stages ---------------------------------------------------


def _tree(root: Path, skip: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if skip not in p.parents and p != skip)


def _bad_sources(root: Path) -> dict[str, list[SourceConfig]]:
    und = root / "und"
    (und / "images").mkdir(parents=True)
    (und / "images" / "good0.png").write_bytes(png(0))
    (und / "images" / "good1.jpg").write_bytes(jpg(1))
    (und / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 50)
    (und / "images" / "truncated.jpg").write_bytes(truncated(jpg(2, size=64), 0.5))
    (und / "images" / "bomb.png").write_bytes(bomb_png())
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    write_jsonl(und / "llava.jsonl", [
        {"id": "good0", "image": "good0.png", "conversations": conv},
        {"id": "good1", "image": "good1.jpg", "conversations": conv},
        {"id": "corrupt", "image": "corrupt.png", "conversations": conv},
        {"id": "truncated", "image": "truncated.jpg", "conversations": conv},
        {"id": "missing", "image": "missing.png", "conversations": conv},
        {"id": "bomb", "image": "bomb.png", "conversations": conv},
        b'{"id": "malformed", "image": "good0.png", "conversations": [',
        b'{"id": "latin1", "image": "good0.png", "conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}',
    ])
    vids = und / "videos"
    write_video(vids / "good.mp4", n_frames=8, fps=8)
    (vids / "empty.mp4").write_bytes(b"")
    (vids / "garbage.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x13not a video" * 300)
    write_jsonl(und / "videoqa.jsonl", [
        {"id": f"v-{n}", "video": f"{n}.mp4", "question": "Which way does it move?", "answer": "right"} for n in ("good", "empty", "garbage")
    ])

    gen = root / "gen"
    write_tar(gen / "00000.tar", img2dataset_members(range(4)) + [("../evil.jpg", jpg(9)), ("/tmp/abs_evil.jpg", jpg(9))])
    t = write_tar(gen / "00001.tar", img2dataset_members(range(10, 14), shard=1))
    data = t.read_bytes()
    t.write_bytes(data[: data.find(b"000010012.jpg") + 600])  # keys 10, 11 complete; 12 cut
    dup = [(n.replace("000000003", "000000099"), d) for n, d in img2dataset_members([3]) if n.endswith((".jpg", ".json"))]
    write_tar(gen / "00002.tar", dup + [("000000099.txt", b"the same picture, another caption")])
    write_caption_parquet(root / "gen_pq" / "p.parquet", [{"image": hf_image(png(20 + i)), "caption": f"a parquet box {i}"} for i in range(3)])

    vid = root / "vid"
    write_video(vid / "videos" / "1.mp4", n_frames=8, fps=8)
    write_video(vid / "videos" / "2.webm", n_frames=8, fps=8, codec="libvpx")
    (vid / "videos" / "3.mp4").write_bytes(b"")
    (vid / "videos" / "4.mp4").write_bytes(b"\x1a\x45\xdf\xa3" + b"junk" * 300)
    (vid / "labels").mkdir(parents=True)
    (vid / "labels" / "train.json").write_text(json.dumps([
        {"id": str(i), "label": "Moving box from left to right", "template": "Moving [something] from left to right", "placeholders": ["box"]}
        for i in range(1, 6)  # 5 has no video at all
    ]))

    vt = root / "vt"
    (vt / "images").mkdir(parents=True)
    (vt / "images" / "a.png").write_bytes(png(5, size=64))
    write_jsonl(vt / "viscot.jsonl", [
        {"question_id": "in", "image": "a.png", "question": "What colour is the box?", "answer": "red", "bbox": [0, 0, 21, 21]},
        {"question_id": "in_xyxy_edge", "image": "a.png", "question": "What is at the edge?", "answer": "dot", "bbox": [50, 50, 64, 64]},
        {"question_id": "out", "image": "a.png", "question": "q?", "answer": "a", "bbox": [40, 40, 90, 90]},
    ])

    edit = root / "edit"
    write_edit_parquet(edit / "train-00000.parquet", [
        {"original_image": hf_image(png(30)), "edit_prompt": "make the box blue", "edited_image": hf_image(png(31))},
        {"original_image": hf_image(png(32)), "edit_prompt": "move the box left", "edited_image": hf_image(png(33))},
        {"original_image": hf_image(png(34)), "edit_prompt": "make it green", "edited_image": hf_image(b"\xff\xd8\xff broken jpeg")},
    ])
    return {
        "understanding": [SourceConfig(name="llava", format="llava", path=str(und / "llava.jsonl"), image_root=str(und / "images")),
                          SourceConfig(name="vqa", format="videoqa", path=str(und / "videoqa.jsonl"), video_root=str(vids))],
        "generation": [SourceConfig(name="tars", format="img2dataset", path=str(gen)),
                       SourceConfig(name="pq", format="parquet", path=str(root / "gen_pq"))],
        "video": [SourceConfig(name="ssv2", format="ssv2", path=str(vid / "labels" / "train.json"))],
        "visual_thinking": [SourceConfig(name="vcot", format="viscot", path=str(vt / "viscot.jsonl"), image_root=str(vt / "images"))],
        "image_edit": [SourceConfig(name="ip2p", format="instructpix2pix", path=str(edit))],
    }


EXPECTED = {
    # family: (reasons, ids that must survive)
    "understanding": (
        {"image_decode_error": 2, "image_missing": 1, "decompression_bomb": 1, "malformed_json": 1, "non_utf8_text": 1, "video_empty": 1, "video_decode_error": 1},
        {"llava-good0", "llava-good1", "vqa-v-good"},
    ),
    "generation": (
        {"unsafe_tar_member": 2, "truncated_tar": 1, "duplicate": 1},
        {f"tars-00000000{i}" for i in range(4)} | {"tars-000010010", "tars-000010011"} | {f"pq-p-{i:08d}" for i in range(3)},
    ),
    "video": ({"video_empty": 1, "video_decode_error": 1, "video_missing": 1}, {"ssv2-1", "ssv2-2"}),
    "visual_thinking": ({"bbox_out_of_bounds": 1}, {"vcot-in", "vcot-in_xyxy_edge"}),
    "image_edit": ({"image_decode_error": 1}, {"ip2p-train-00000-00000000", "ip2p-train-00000-00000001"}),
}
CONFIGS = {
    "understanding": (CurateUnderstanding, CurateUnderstandingConfig),
    "generation": (CurateGeneration, CurateGenerationConfig),
    "video": (CurateVideo, CurateVideoConfig),
    "visual_thinking": (CurateVisualThinking, CurateVisualThinkingConfig),
    "image_edit": (CurateImageEdit, CurateImageEditConfig),
}


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_bad_inputs_quarantined_with_distinct_reasons(ray_session, tmp_path):
    data = tmp_path / "data"
    sources = _bad_sources(data)
    runs = tmp_path / "runs"
    before = _tree(tmp_path, runs)
    for family, (S, C) in CONFIGS.items():
        # no held-out split here: every good record must come out, in the train shards
        cfg = C(sources=sources[family], records_per_task=3, heldout_fraction=0.0)
        assert S().input_artifacts(cfg) == ()
        out, stats = run_stage(S(), cfg, inputs={}, root=runs)
        _check_counts(stats)
        want_reasons, want_ids = EXPECTED[family]
        got = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("quarantine/")}
        assert got == want_reasons, family
        ids = {s.id for s, _ in iter_samples(out / S.outputs[0])}
        assert ids == want_ids, family
        lines = _quarantine(out, S.outputs[0])
        assert len(lines) == stats["quarantined"] and all(q["detail"] and q["source"] for q in lines)
    # nothing was written next to the inputs, nor where the tar members pointed
    assert _tree(tmp_path, runs) == before
    assert not (data / "evil.jpg").exists() and not Path("/tmp/abs_evil.jpg").exists()


# --- the public datasets' own layouts, through the real stages --------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_published_layouts_through_the_stages(ray_session, tmp_path):
    from tests.unit.published_fixtures import write_all

    fixtures = write_all(tmp_path / "data")
    for family, (S, C) in CONFIGS.items():
        sources, good, bad = fixtures[family]
        cfg = C(sources=sources, records_per_task=2, heldout_fraction=0.0, max_aspect=4.0)
        out, stats = run_stage(S(), cfg, inputs={}, root=tmp_path / "runs")
        _check_counts(stats)
        assert {s.id for s, _ in iter_samples(out / S.outputs[0])} == good, family
        got = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("quarantine/")}
        assert got == bad, family
        for s in sources:  # out + quarantined = in, per source, in the manifest's stats
            n_in, n_out, n_q = (stats[f"source/{s.name}/{k}"] for k in ("records_in", "samples_out", "quarantined"))
            assert n_out + n_q == n_in and n_in > 0, (family, s.name)
            assert n_out == sum(1 for g in good if g.startswith(f"{s.name}-"))
            assert n_q == sum(v for k, v in stats.items() if k.startswith(f"source/{s.name}/quarantine/"))
        lines = _quarantine(out, S.outputs[0])
        assert len(lines) == stats["quarantined"] and all(q["detail"] and q["reason"] for q in lines)


def test_a_shard_written_in_pieces_gets_its_whole_file_sha256(ray_session, tmp_path):
    """``_write_shards``: a shard one task writes is hashed by that task; a shard split into byte
    ranges is hashed by the driver once its last piece is done. Both equal the file's sha256."""
    import hashlib
    from types import SimpleNamespace

    from metamorph.data.shards import Spool, sample_members, shard_name, tar_member
    from metamorph.data.spool import shard_bytes
    from pipelines.stage import StageContext
    from stages._curation import _write_shards

    spool_path = tmp_path / "spool.bin"
    metas = []
    with Spool(spool_path) as sp:
        for i in range(9):
            key = f"s{i:02d}"
            (rec, _), (img, images) = sample_members(key, b'{"t": 1}', [bytes([i]) * (1000 + 300 * i)])
            parts = [tar_member(rec, b'{"t": 1}'), tar_member(rec, b'{"h": 1}'), tar_member(img, images), b"thumb"]
            offset, lengths = sp.append(parts)
            metas.append({"id": key, "source": "x", "family": "f", "task": "t", "spool": str(spool_path), "offset": offset,
                          "parts": lengths, "sha": ["a"], "phash": [1]})
    out = tmp_path / "art"
    out.mkdir()
    jobs, pieces = [], {0: [(0, 3), (3, 5), (5, 6)], 1: [(6, 9)]}  # shard 0 in three byte ranges, shard 1 whole
    for k, ranges in pieces.items():
        sizes = [shard_bytes(m, "train") for m in metas]
        total = sum(sizes[ranges[0][0]:ranges[-1][1]])
        (out / shard_name("train", k)).write_bytes(b"")
        offset = 0
        for a, b in ranges:
            jobs.append(("train", k, offset, metas[a:b], total if b == ranges[-1][1] else None))
            offset += sum(sizes[a:b])
    ctx = StageContext(stage="curate_x", key="k", cfg=None, seed=0, inputs={}, work_dir=tmp_path, checkpoint_dir=tmp_path / "c",
                       run_root=tmp_path)
    results = _write_shards(ctx, "art", SimpleNamespace(cpus_per_task=1.0), out, jobs)
    assert [len(rows) for rows, _ in results] == [3, 2, 1, 3]
    for k in pieces:
        name = shard_name("train", k)
        data = (out / name).read_bytes()
        assert ctx.digests[f"art/{name}"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    import tarfile

    names = [n for k in pieces for n in tarfile.open(out / shard_name("train", k)).getnames()]
    assert names == [n for m in metas for n in (f"{m['id']}.json", f"{m['id']}.images.mp")]  # whole, valid tars
