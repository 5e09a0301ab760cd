"""Ray Data glue shared by the five curation stages (the record logic is ``metamorph.data.curate``).

    python -c "from pipelines.testing import run_stage; from stages.curate_generation import CurateGeneration as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs'))"

Three passes over the data; image bytes never reach the driver:

1. parallel (Ray Data, one streaming pass, one map operator): plan units of at most about
   ``records_per_task`` records on the driver (a JSONL/CSV byte range, a JSON-array element range,
   a tar member range, a Parquet row range: a big file is split here), then one task per unit
   reads it and decodes, validates, resizes, encodes, hashes and converts every record. Each task
   parks its samples as ready tar members (both split encodings of the record, the images) and
   the thumbnails in one spool file under the attempt dir, and returns only metadata rows with
   their spool offsets.
2. driver, metadata only: duplicate ids, exact duplicates, the train/held-out split, and the
   contamination guard need a view of the whole stage, so they run once over small rows
   (``metamorph.data.curate.decide``; the few thumbnails it needs are read from the spool).
   Then the kept samples are sorted by id and cut into size-bounded shards (``plan_shards`` on
   their bytes in the tar): the same rule one sequential writer applies, so a rerun writes
   byte-identical files whatever the task scheduling was.
3. parallel Ray tasks, one per shard, or per byte range of a shard when there are fewer shards
   than CPUs to write them (``write_shard_piece``: a small stage's one big train shard is then
   written by every worker at once): copy the spooled members into the tar, and return their
   index and image-hash rows; the driver writes ``index.parquet`` and ``image_hashes.parquet``
   from them in shard order and removes the spool.

Output (``ctx.output(<artifact>)``): ``shard-{train,heldout}-NNNNN.tar``, ``index.parquet``,
``quarantine.jsonl`` (one line per rejected record) and ``image_hashes.parquet`` (sha256 and pHash
of every written image, so ``mix`` can guard contamination across families without decoding).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Iterator, Optional

from metamorph.data.curate import CurateConfig, FramePredictionConfig, decide, process_record
from metamorph.data.imageproc import keep_image_buffers
from metamorph.data.readers import FAMILY_FORMATS, READERS, SourceConfig, check_source
from metamorph.data.readers.base import RawRecord, list_files
from metamorph.data.schema import sample_key
from metamorph.data.shards import QUARANTINE_FILE, Piece, Spool, plan_shards, read_spool, sample_members, shard_name, tar_member, tar_member_parts, write_index, write_shard_piece
from metamorph.data.video import VideoConfig
from pipelines.stage import Stage, StageConfig, StageContext

if TYPE_CHECKING:
    import pyarrow as pa

WORLD = "world"
WORLD_PREFIX = "world:"
HASHES_FILE = "image_hashes.parquet"
SPOOL_DIR = "_spool"  # under the attempt dir, removed before the stage returns


@functools.cache
def _schemas() -> dict[str, pa.Schema]:
    """HASHES_SCHEMA and META_SCHEMA, built on first use: `metamorph plan` imports this module,
    and pyarrow only when a stage runs."""
    import pyarrow as pa

    return {
        "HASHES_SCHEMA": pa.schema(
            [("id", pa.string()), ("split", pa.string()), ("image", pa.int32()), ("sha", pa.string()), ("phash", pa.int64()), ("thumb", pa.binary())]
        ),
        # what a processing task returns per record (``decide``'s inputs and where the bytes are
        # parked); ``parts``: byte lengths of [train record member, held-out record member, images
        # member, thumbnail 0..n-1] (members: tar header + payload + padding, see ``_members``)
        "META_SCHEMA": pa.schema(
            [
                ("id", pa.string()), ("source", pa.string()), ("locator", pa.string()), ("order", pa.string()),
                ("reason", pa.string()), ("detail", pa.string()), ("family", pa.string()), ("task", pa.string()),
                ("content_hash", pa.string()), ("sha", pa.list_(pa.string())), ("phash", pa.list_(pa.int64())),
                ("n_decoded", pa.int32()),
                ("spool", pa.string()), ("offset", pa.int64()), ("parts", pa.list_(pa.int64())),
            ]
        ),
    }


def __getattr__(name: str) -> Any:
    if name in ("HASHES_SCHEMA", "META_SCHEMA"):
        return _schemas()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(kw_only=True)
class CurationStageConfig(StageConfig, CurateConfig):
    """Fields every curation stage shares; per-stage subclasses set the default sources."""

    sources: list[SourceConfig] = field(default_factory=list)  # several per family allowed
    shard_max_mb: int = 64  # shard size bound (MiB): big enough to stream, small enough to retry
    shard_max_samples: int = 10_000  # and a sample-count bound, whichever comes first
    # --- operational (outside the cache key)
    records_per_task: int = 256  # records per Ray task: the readers cut files into units of about this many
    cpus_per_task: float = 1.0  # Ray CPUs per processing task; < 1 packs more tasks per core

    def __post_init__(self) -> None:
        CurateConfig.__post_init__(self)
        if not self.sources:
            raise ValueError("sources is empty: list at least one {name, format, path}")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources[].name must be unique, got {names}")
        if self.shard_max_mb < 1 or self.shard_max_samples < 1:
            raise ValueError(f"shard_max_mb={self.shard_max_mb}, shard_max_samples={self.shard_max_samples}: both must be >= 1")
        if self.records_per_task < 1:
            raise ValueError(f"records_per_task={self.records_per_task}: must be >= 1")
        if not 0 < self.cpus_per_task <= 64:
            raise ValueError(f"cpus_per_task={self.cpus_per_task}: use (0, 64]")


def uses_world(src: SourceConfig) -> bool:
    return any(v is not None and v.startswith(WORLD_PREFIX) for v in (src.path, src.image_root, src.video_root))


def resolve_path(value: Optional[str], world: Optional[Path]) -> Optional[str]:
    """``world:rel`` -> inside the world artifact; anything else -> an absolute local path."""
    if value is None:
        return None
    if value.startswith(WORLD_PREFIX):
        if world is None:
            raise ValueError(f"{value!r} needs the 'world' artifact, which this run did not provide")
        rel = value[len(WORLD_PREFIX) :].lstrip("/")
        return str(Path(world) / rel)
    return str(Path(value).expanduser().absolute())


def resolve_source(src: SourceConfig, world: Optional[Path]) -> SourceConfig:
    return dataclasses.replace(
        src,
        path=resolve_path(src.path, world),
        image_root=resolve_path(src.image_root, world),
        video_root=resolve_path(src.video_root, world),
    )


def library_config(cfg: Any, cls: type) -> Any:
    """The library part of a stage config (a plain dataclass the workers can unpickle)."""
    if not isinstance(cfg, cls):
        return None
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


# --- Ray task bodies (module-level: pickled by reference) ----------------------------------------------


def _read_process(batch: pa.Table, sources: list[dict[str, Any]], cfg: CurateConfig, video: Optional[VideoConfig],
                  frames: Optional[FramePredictionConfig], spool_dir: str) -> pa.Table:
    """Read the batch's units (one per batch) and process their records, as they are read, in this task."""

    keep_image_buffers()

    def records() -> Iterator[RawRecord]:
        for row in batch.to_pylist():
            src = SourceConfig(**sources[row["source"]])
            yield from READERS[src.format].read(src, json.loads(row["unit"]), row["unit_idx"])

    return _process(records(), cfg, video, frames, spool_dir)


def _process(records: Iterable[RawRecord], cfg: CurateConfig, video: Optional[VideoConfig], frames: Optional[FramePredictionConfig], spool_dir: str) -> pa.Table:
    # a fresh name per attempt: a retried task never appends to what a failed one left
    spool = Spool(Path(spool_dir) / f"{uuid.uuid4().hex}.bin")
    rows = []
    with spool:
        for rec in records:
            r = process_record(rec, cfg, video, frames)
            if r["reason"]:
                r.update(spool="", offset=0, parts=[])
            else:  # spooled now: the task holds one record's bytes at a time
                offset, parts = spool.append(_members(r))
                r.update(spool=str(spool.path), offset=offset, parts=parts, images=None, thumb=None, sample=None, sample_heldout=None)
            rows.append(r)
    # column by column: 10x cheaper than from_pylist's per-row dict walk
    import pyarrow as pa

    schema = _schemas()["META_SCHEMA"]
    return pa.Table.from_pydict({name: [r[name] for r in rows] for name in schema.names}, schema=schema)


def _members(r: dict[str, Any]) -> list[Piece]:
    """A processed record as the spool keeps it: its tar members (``sample_members``: the
    record, here twice, as the train and as the held-out split, then the images member), already
    encoded, then the raw thumbnails. Encoding the tar headers here, in parallel, leaves the
    shard writers a plain byte copy."""
    (rec_name, train_rec), (img_name, images) = sample_members(sample_key(r["id"]), r["sample"].encode(), r["images"])
    return [
        tar_member(rec_name, train_rec),
        tar_member(rec_name, r["sample_heldout"].encode()),
        tar_member_parts(img_name, images),
        *r["thumb"],
    ]


def _spooled(f: Any, m: dict[str, Any]) -> tuple[bytes, bytes, bytes, list[bytes]]:
    """(train record member, held-out record member, images member, thumbnails) of one meta row
    from its open spool."""
    parts = read_spool(f, m["offset"], m["parts"])
    return parts[0], parts[1], parts[2], parts[3:]


def _spooled_thumbs(f: Any, m: dict[str, Any]) -> list[bytes]:
    """Only the thumbnails of one meta row (the item's last parts) from its open spool."""
    return read_spool(f, m["offset"] + sum(m["parts"][:3]), m["parts"][3:])


def shard_bytes(m: dict[str, Any], split: str) -> int:
    """Bytes a meta row's sample takes in a ``split`` shard (its record and images members)."""
    return m["parts"][0 if split == "train" else 1] + m["parts"][2]


def _write_piece(out: str, split: str, shard: int, offset: int, metas: list[dict[str, Any]], total: int | None) -> tuple[list[dict[str, Any]], pa.Table]:
    """Samples ``metas`` (in id order) of one planned shard, from byte ``offset`` of it: their
    spooled members copied into the tar (``total``: the shard's member bytes, for its last
    piece), and their index and image-hash rows."""
    files: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    hashes: list[dict[str, Any]] = []
    name = shard_name(split, shard)

    def members() -> Iterator[bytes]:
        for m in metas:
            f = files.get(m["spool"]) or files.setdefault(m["spool"], open(m["spool"], "rb"))
            train_rec, held_rec, images, thumbs = _spooled(f, m)
            rows.append({"id": m["id"], "key": sample_key(m["id"]), "source": m["source"], "family": m["family"], "task": m["task"],
                         "split": split, "shard": name, "n_images": len(m["sha"])})
            hashes.extend({"id": m["id"], "split": split, "image": i, "sha": s, "phash": p, "thumb": t}
                          for i, (s, p, t) in enumerate(zip(m["sha"], m["phash"], thumbs)))
            yield train_rec if split == "train" else held_rec
            yield images

    try:
        write_shard_piece(Path(out) / name, offset, members(), total)
    finally:
        for f in files.values():
            f.close()
    import pyarrow as pa

    return rows, pa.Table.from_pylist(hashes, schema=_schemas()["HASHES_SCHEMA"])


def _pieces(sizes: list[int], target: int) -> list[tuple[int, int]]:
    """Consecutive ranges of ``sizes`` of about equal bytes, each near ``target`` (the count is
    rounded up, so none is a small remainder); at least one sample each."""
    total = sum(sizes)
    n = max(1, -(-total // max(1, target)))
    out, a, acc = [], 0, 0
    for i, z in enumerate(sizes):
        acc += z
        if acc * n >= total * (len(out) + 1) and i + 1 < len(sizes):
            out.append((a, i + 1))
            a = i + 1
    out.append((a, len(sizes)))
    return out


def _rows(ds: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        out.extend(b.to_pylist())
    return out


class CurationStage(Stage):
    """Base of the five curation stages: ``family`` picks the readers a source may use."""

    family: ClassVar[str]
    inputs = (WORLD,)  # only when a source says "world:..." (see input_artifacts)
    operational = frozenset({"records_per_task", "cpus_per_task"})

    @property
    def artifact(self) -> str:
        return self.outputs[0]

    def input_artifacts(self, cfg: CurationStageConfig) -> tuple[str, ...]:
        return (WORLD,) if any(uses_world(s) for s in cfg.sources) else ()

    def validate(self, cfg: CurationStageConfig) -> None:
        allowed = FAMILY_FORMATS[self.family]
        for i, s in enumerate(cfg.sources):
            if s.format not in allowed:
                raise ValueError(f"stages.{self.name}.sources[{i}].format={s.format!r}: {self.family} reads {list(allowed)}")
            check_source(s, f"stages.{self.name}.sources[{i}]")
            if not s.path.startswith(WORLD_PREFIX) and not Path(s.path).expanduser().exists():
                raise ValueError(f"stages.{self.name}.sources[{i}].path={s.path!r} does not exist")

    def resources(self, cfg: CurationStageConfig) -> dict[str, float]:
        # Ray Data spreads the tasks over whatever is free; what must fit is one processing task
        return {"CPU": cfg.cpus_per_task}

    def fingerprint(self, cfg: CurationStageConfig) -> dict[str, Any]:
        """Size and mtime of external annotation files and shards (world sources are keyed by the
        world stage's key). Image/video files are not stat'ed: millions of them would make
        planning slow; replace or re-date the annotation file when they change."""
        out: dict[str, Any] = {}
        for s in cfg.sources:
            if s.path.startswith(WORLD_PREFIX):
                continue
            p = Path(s.path).expanduser()
            files = list_files(p, READERS[s.format].suffixes) if p.exists() else []
            out[s.name] = [[str(f), f.stat().st_size, int(f.stat().st_mtime)] for f in files]
        return out

    def run(self, ctx: StageContext) -> dict[str, float]:
        return run_curation(ctx, self.artifact, ctx.cfg)


def source_counts(meta: list[dict[str, Any]], written: list[dict[str, Any]], rejects: list[dict[str, Any]], names: list[str]) -> dict[str, float]:
    """``source/{name}/records_in``, ``/samples_out``, ``/quarantined`` and ``/quarantine/{reason}``
    for every configured source (a source with no records reports zeros), after checking that
    each one's records in equal its samples out plus its quarantined records."""
    n_in = collections.Counter(m["source"] for m in meta)
    n_out = collections.Counter(r["source"] for r in written)
    n_q = collections.Counter(q["source"] for q in rejects)
    out: dict[str, float] = {}
    for name in names:
        if n_out[name] + n_q[name] != n_in[name]:
            raise RuntimeError(f"source {name}: {n_out[name]} written + {n_q[name]} quarantined != {n_in[name]} records in")
        out.update({f"source/{name}/records_in": n_in[name], f"source/{name}/samples_out": n_out[name], f"source/{name}/quarantined": n_q[name]})
    for (name, reason), n in sorted(collections.Counter((q["source"], q["reason"]) for q in rejects).items()):
        out[f"source/{name}/quarantine/{reason}"] = n
    return out


def _slots(cfg: CurationStageConfig) -> int:
    """Tasks of ``cfg.cpus_per_task`` CPUs the cluster runs at once."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) / cfg.cpus_per_task))


def processing_dataset(units: list[dict[str, Any]], sources: list[SourceConfig], cfg: CurationStageConfig, spool_dir: Path | str = SPOOL_DIR) -> Any:
    """The lazy Ray Dataset of processed rows (``META_SCHEMA``) for the planned units; the
    encoded samples land in spool files under ``spool_dir``."""
    import ray

    ds = ray.data.from_items(units, override_num_blocks=min(len(units), 1000))  # a task per unit (up to 1000 blocks)
    # per-dataset context: other stages run in threads of the same driver
    ds.context.enable_progress_bars = False
    # Ray Data's per-operator reservation splits the cluster between the input buffer and this
    # one map operator, so with 1-CPU tasks it ran one task at a time (a second one only after a
    # while, and ~0.2 s idle between tasks) on a 2-CPU node: half the cores idle. Inputs (unit
    # descriptors) and outputs (metadata rows) are small, so there is no memory to guard here;
    # instead cap the tasks in flight at four times what the CPUs run at once: queued tasks keep
    # the workers busy between tasks (Ray pushes the next one to a worker it already holds; 2x
    # measured ~2% slower, 1x ~10%), without flooding Ray's queue for other stages.
    ds.context.op_resource_reservation_enabled = False
    slots = _slots(cfg)
    # one task per unit (at most ``records_per_task`` records, see the readers' ``plan``): read,
    # decode, convert and spool in the same task, so raw bytes never travel between tasks
    return ds.map_batches(
        _read_process, batch_size=1, batch_format="pyarrow", num_cpus=cfg.cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(4 * slots, len(units)))),
        fn_kwargs={"sources": [dataclasses.asdict(s) for s in sources], "cfg": library_config(cfg, CurateConfig),
                   "video": library_config(cfg, VideoConfig), "frames": library_config(cfg, FramePredictionConfig),
                   "spool_dir": str(spool_dir)},
    )


def run_curation(ctx: StageContext, artifact: str, cfg: CurationStageConfig) -> dict[str, float]:
    t0 = time.perf_counter()
    world = ctx.inputs.get(WORLD)
    sources = [resolve_source(s, world) for s in cfg.sources]
    units: list[dict[str, Any]] = []
    for si, src in enumerate(sources):
        for u in READERS[src.format].plan(src, cfg.records_per_task):
            units.append({"source": si, "unit": json.dumps(u), "unit_idx": len(units)})
    out = ctx.output(artifact).absolute()  # absolute: tasks run in other working directories
    spool_dir = (ctx.work_dir / SPOOL_DIR).absolute()
    spool_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _curate(ctx, artifact, cfg, units, sources, out, spool_dir, t0)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def _curate(ctx: StageContext, artifact: str, cfg: CurationStageConfig, units: list[dict[str, Any]], sources: list[SourceConfig],
            out: Path, spool_dir: Path, t0: float) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    meta = _rows(processing_dataset(units, sources, cfg, spool_dir)) if units else []
    t_process = time.perf_counter() - t0

    first: dict[str, dict[str, Any]] = {}  # id -> its accepted row with the smallest order (decide's pick)
    for m in meta:
        if not m["reason"] and (m["id"] not in first or m["order"] < first[m["id"]]["order"]):
            first[m["id"]] = m

    def thumbs(ids: set[str]) -> dict[str, list[bytes]]:
        got: dict[str, list[bytes]] = {}
        by_spool: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for sid in ids:
            by_spool[first[sid]["spool"]].append(first[sid])
        for path, ms in by_spool.items():  # each spool opened once, read in offset order
            with open(path, "rb") as f:
                for m in sorted(ms, key=lambda m: m["offset"]):
                    got[m["id"]] = _spooled_thumbs(f, m)
        return got

    t_decide = time.perf_counter()
    dec = decide(
        meta,
        heldout_fraction=cfg.heldout_fraction,
        phash_max_distance=cfg.phash_max_distance,
        near_copy_max_diff=cfg.near_copy_max_diff,
        thumbs=thumbs,
    )
    max_bytes, max_samples = cfg.shard_max_mb * 2**20, cfg.shard_max_samples
    shards = []  # (split, shard number, its samples, their bytes in the tar), train shards first
    for split in ("train", "heldout"):
        kept = sorted((m for m in meta if dec.keep.get((m["id"], m["order"])) == split), key=lambda m: m["id"])
        sizes = [shard_bytes(m, split) for m in kept]
        for k, (a, b) in enumerate(plan_shards(sizes, max_bytes, max_samples)):
            shards.append((split, k, kept[a:b], sizes[a:b]))
    # pieces of about 1/(2 x CPUs) of all the bytes (>= 4 MiB): a stage with fewer shards than
    # CPUs still writes on every CPU; a big stage keeps one task per shard. Only on one node:
    # disjoint writes into one file from several hosts are not safe on every shared file system
    slots = _slots(cfg)
    one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    target = max(4 * 2**20, sum(sum(z) for *_, z in shards) // (2 * slots)) if one_node else max_bytes + 1
    jobs = []  # (split, shard number, piece offset, its samples, the shard's member bytes if last)
    for split, k, ms, sizes in shards:
        (out / shard_name(split, k)).write_bytes(b"")  # the pieces write into it, never truncate it
        total, offset = sum(sizes), 0
        for a, b in _pieces(sizes, target):
            jobs.append((split, k, offset, ms[a:b], total if b == len(sizes) else None))
            offset += sum(sizes[a:b])
    t_write = time.perf_counter()
    write = ray.remote(_write_piece).options(num_cpus=cfg.cpus_per_task)  # the processing slots: no extra workers to start
    refs = [write.remote(str(out), split, k, offset, ms, total) for split, k, offset, ms, total in jobs]
    results = ray.get(refs)
    index_rows = [r for rows, _ in results for r in rows]
    hashes = pa.concat_tables([h for _, h in results]) if results else _schemas()["HASHES_SCHEMA"].empty_table()
    n_split = collections.Counter(r["split"] for r in index_rows)
    write_index(out, index_rows)
    for shard, n in collections.Counter(r["shard"] for r in index_rows).items():
        ctx.record_rows(f"{artifact}/{shard}", n)

    with open(out / QUARANTINE_FILE, "w", encoding="utf-8") as f:
        for q in dec.rejects:
            f.write(json.dumps({k: q[k] for k in ("source", "id", "locator", "reason", "detail")}, ensure_ascii=False) + "\n")
    ctx.record_rows(f"{artifact}/{QUARANTINE_FILE}", len(dec.rejects))

    pq.write_table(hashes, out / HASHES_FILE)

    records_in = len(meta)
    n_out = len(index_rows)
    if n_out + len(dec.rejects) != records_in:  # every record is either written or quarantined
        raise RuntimeError(f"{ctx.stage}: {n_out} written + {len(dec.rejects)} quarantined != {records_in} records in")
    per_source = source_counts(meta, index_rows, dec.rejects, [s.name for s in sources])
    seconds = time.perf_counter() - t0
    decoded = sum(m["n_decoded"] for m in meta)
    stats: dict[str, float] = {
        "records_in": records_in,
        "samples_out": n_out,
        "quarantined": len(dec.rejects),
        "read_units": len(units),
        "images_decoded": decoded,
        "images_out": sum(r["n_images"] for r in index_rows),
        "images_per_s": decoded / seconds if seconds > 0 else 0.0,
        "seconds_process": t_process,  # read + decode + convert + spool, in parallel
        "seconds_decide": t_write - t_decide,  # dedup, split, contamination, shard plan on the driver
        "seconds_write": seconds - (t_write - t0),  # shards (parallel), index, hashes, quarantine
        "seconds": seconds,
        **dec.stats,
    }
    for split in ("train", "heldout"):
        stats[f"split/{split}"] = n_split[split]
    for task, n in sorted(collections.Counter(r["task"] for r in index_rows).items()):
        stats[f"task/{task}"] = n
    for reason, n in sorted(collections.Counter(q["reason"] for q in dec.rejects).items()):
        stats[f"quarantine/{reason}"] = n
    stats.update(per_source)
    if dec.rejects and (out / QUARANTINE_FILE).stat().st_size < 32 * 2**20:
        ctx.log_artifact(out / QUARANTINE_FILE)
    return stats
