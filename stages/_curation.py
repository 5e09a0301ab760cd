"""Ray Data glue shared by the five curation stages (the record logic is ``metamorph.data.curate``,
the spool and shard layout ``metamorph.data.spool``).

    python -c "from pipelines.testing import run_stage; from stages.curate_generation import CurateGeneration as S; print(run_stage(S(), S.config_cls(), inputs={'world': 'runs/world/KEY/world'}, root='/tmp/runs'))"

Three passes; image bytes never reach the driver. (1) Ray Data, one streaming map: the driver
plans read units of about ``records_per_task`` records (a big file is split here) and one task
per unit reads, decodes, validates, converts and spools its records (``spool.read_process``),
returning only metadata rows. (2) Driver, metadata only: duplicates, the train/held-out split
and the contamination guard (``curate.decide``), then the shard plan (``spool.plan_writes``: the
rule one sequential writer applies, so reruns are byte-identical). (3) Ray tasks, one per shard
or per byte range of a shard (``spool.write_piece``): copy the spooled members into the tars; the
driver writes the index and image hashes in shard order and removes the spool.

Output (``ctx.output(<artifact>)``): ``shard-{train,heldout}-NNNNN.tar``, ``index.parquet``,
``quarantine.jsonl`` (one line per rejected record) and ``image_hashes.parquet`` (sha256 and pHash
of every written image, so ``mix`` can guard contamination across families without decoding).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from metamorph.data.curate import CurateConfig, FramePredictionConfig, decide
from metamorph.data.readers import FAMILY_FORMATS, READERS, SourceConfig, check_source
from metamorph.data.readers.base import WORLD_PREFIX, list_files, resolve_source, uses_world
from metamorph.data.digest import hashing_open
from metamorph.data.shards import INDEX_FILE, QUARANTINE_FILE, write_index

from metamorph.data.spool import (HASHES_FILE, SPOOL_DIR, ShardDigests, curation_stats, first_accepted, plan_writes, read_process, hashes_schema,
                                  thumbs_reader, write_piece, write_quarantine)
from metamorph.data.video import VideoConfig
from pipelines.stage import Stage, StageConfig, StageContext, operational

if TYPE_CHECKING:
    import pyarrow as pa

WORLD = "world"


@dataclass(kw_only=True)
class CurationStageConfig(StageConfig, CurateConfig):
    """Fields every curation stage shares; per-stage subclasses set the default sources."""

    sources: list[SourceConfig] = field(default_factory=list)  # several per family allowed
    shard_max_mb: int = 64  # shard size bound (MiB): big enough to stream, small enough to retry
    shard_max_samples: int = 10_000  # and a sample-count bound, whichever comes first
    # --- operational (outside the cache key)
    records_per_task: int = field(default=256, metadata=operational())  # records per Ray task: the readers cut files into units of about this many
    cpus_per_task: float = field(default=1.0, metadata=operational())  # Ray CPUs per processing task; < 1 packs more tasks per core

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


def library_part(cfg: Any, cls: type) -> Any:
    """The library part of a stage config (a plain dataclass the workers can unpickle)."""
    if not isinstance(cfg, cls):
        return None
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def _rows(ds: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for b in ds.iter_batches(batch_size=4096, batch_format="pyarrow"):
        out.extend(b.to_pylist())
    return out


def _write_shards(ctx: StageContext, artifact: str, cfg: CurationStageConfig, out: Path,
                  jobs: list[tuple[str, int, int, list[dict[str, Any]], Optional[int]]]) -> list[tuple[list[dict[str, Any]], pa.Table]]:
    """Run the piece writers (``write_piece``) as Ray tasks; return their (index rows,
    image-hash rows) in job order, and record each shard's sha256 for the manifest as soon as
    its last piece is done (``ShardDigests``)."""
    import ray

    write = ray.remote(write_piece).options(num_cpus=cfg.cpus_per_task)  # the processing slots: no extra workers to start
    pending = {write.remote(str(out), split, k, offset, ms, total): j for j, (split, k, offset, ms, total) in enumerate(jobs)}
    digests = ShardDigests(out, jobs)
    results: list[Any] = [None] * len(jobs)
    while pending:
        ray.wait(list(pending), num_returns=1)  # block for one, then take every finished one
        done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
        for ref in done:
            j = pending.pop(ref)
            rows, hashes, sha = ray.get(ref)
            results[j] = (rows, hashes)
            finished = digests.piece_done(j, sha)
            if finished:
                ctx.record_digest(f"{artifact}/{finished[0]}", finished[1])
    return results


class CurationStage(Stage):
    """Base of the five curation stages: ``family`` picks the readers a source may use."""

    family: ClassVar[str]
    inputs = (WORLD,)  # only when a source says "world:..." (see input_artifacts)

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



def _slots(cfg: CurationStageConfig) -> int:
    """Tasks of ``cfg.cpus_per_task`` CPUs the cluster runs at once."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) / cfg.cpus_per_task))


def processing_dataset(units: list[dict[str, Any]], sources: list[SourceConfig], cfg: CurationStageConfig, spool_dir: Path | str = SPOOL_DIR) -> Any:
    """The lazy Ray Dataset of processed rows (``spool.meta_schema()``) for the planned units; the
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
        read_process, batch_size=1, batch_format="pyarrow", num_cpus=cfg.cpus_per_task,
        compute=ray.data.TaskPoolStrategy(size=max(1, min(4 * slots, len(units)))),
        fn_kwargs={"sources": [dataclasses.asdict(s) for s in sources], "cfg": library_part(cfg, CurateConfig),
                   "video": library_part(cfg, VideoConfig), "frames": library_part(cfg, FramePredictionConfig),
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

    t_decide = time.perf_counter()
    dec = decide(
        meta,
        heldout_fraction=cfg.heldout_fraction,
        phash_max_distance=cfg.phash_max_distance,
        near_copy_max_diff=cfg.near_copy_max_diff,
        thumbs=thumbs_reader(first_accepted(meta)),
    )
    one_node = sum(1 for n in ray.nodes() if n.get("Alive")) == 1
    names, jobs = plan_writes(meta, dec.keep, cfg.shard_max_mb * 2**20, cfg.shard_max_samples, _slots(cfg), one_node)
    for name in names:
        (out / name).write_bytes(b"")  # the pieces write into it, never truncate it
    t_write = time.perf_counter()
    results = _write_shards(ctx, artifact, cfg, out, jobs)
    index_rows = [r for rows, _ in results for r in rows]
    hashes = pa.concat_tables([h for _, h in results]) if results else hashes_schema().empty_table()
    ctx.record_digest(f"{artifact}/{INDEX_FILE}", write_index(out, index_rows))
    for shard, n in collections.Counter(r["shard"] for r in index_rows).items():
        ctx.record_rows(f"{artifact}/{shard}", n)
    n_q, digest = write_quarantine(out / QUARANTINE_FILE, dec.rejects)
    ctx.record_rows(f"{artifact}/{QUARANTINE_FILE}", n_q)
    ctx.record_digest(f"{artifact}/{QUARANTINE_FILE}", digest)
    with hashing_open(out / HASHES_FILE) as f:
        pq.write_table(hashes, f)
    ctx.record_digest(f"{artifact}/{HASHES_FILE}", f.digest())

    seconds = time.perf_counter() - t0
    times = {"seconds_process": t_process, "seconds_decide": t_write - t_decide,
             "seconds_write": seconds - (t_write - t0), "seconds": seconds}
    stats = curation_stats(meta, index_rows, dec.rejects, dec.stats, [s.name for s in sources], len(units), times)
    if dec.rejects and (out / QUARANTINE_FILE).stat().st_size < 32 * 2**20:
        ctx.log_artifact(out / QUARANTINE_FILE)
    return stats
