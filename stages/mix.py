"""`mix`: the five curated families -> one training mixture (+ every held-out sample for evaluation).

    python -c "from pipelines.testing import run_stage; from stages.mix import MixStage, MixConfig; print(run_stage(MixStage(), MixConfig(), inputs={f'curated_{f}': f'runs/curate_{f}/KEY/curated_{f}' for f in ('understanding', 'generation', 'video', 'visual_thinking', 'image_edit')}, root='/tmp/runs')[1])"

Output ``mixture/``: ``shard-train-NNNNN.tar`` + ``index.parquet`` (the mixture, in a seeded
interleaved order), ``heldout/`` (``shard-heldout-*.tar`` + ``index.parquet``: all held-out samples
of every family, sorted by family and id) and ``quarantine.jsonl`` (training samples dropped by the
cross-family contamination guard: a held-out image of one family shown in another family's
training sample). Pure I/O on the driver: no decoding, shards are copied member by member.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from metamorph.data.curate import ContaminationGuard
from metamorph.data.mix import FAMILIES, FamilyMix, SampleIndex, copies, interleave, plan_family
from metamorph.data.shards import INDEX_FILE, QUARANTINE_FILE, ShardWriter, list_shards, read_index, write_index, write_jsonl
from pipelines.stage import Stage, StageConfig, StageContext
from metamorph.data.spool import HASHES_FILE

if TYPE_CHECKING:  # pyarrow is imported where used: `metamorph plan` imports every stage module
    import pyarrow as pa


def _families() -> dict[str, FamilyMix]:
    return {f: FamilyMix() for f in FAMILIES}


@dataclass(kw_only=True)
class MixConfig(StageConfig):
    # per family: ratio (sampling rate, > 1 upsamples) and max_samples (cap); every family is an input
    families: dict[str, FamilyMix] = field(default_factory=_families)
    seed: int = 0  # selection and order, combined with the pipeline seed
    # cross-family contamination guard (each curation stage already guarded its own family)
    phash_max_distance: int = 4  # bits of 64, as in the curation stages
    near_copy_max_diff: int = 64  # 0-255 thumbnail levels, as in the curation stages
    shard_max_mb: int = 64  # mixture shard bounds (MiB, samples), whichever comes first
    shard_max_samples: int = 10_000

    def __post_init__(self) -> None:
        unknown = sorted(set(self.families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"families has unknown keys {unknown}; use {list(FAMILIES)}")
        if not 0 <= self.phash_max_distance <= 16 or not 0 <= self.near_copy_max_diff <= 255:
            raise ValueError(f"phash_max_distance={self.phash_max_distance} (0..16), near_copy_max_diff={self.near_copy_max_diff} (0..255)")
        if self.shard_max_mb < 1 or self.shard_max_samples < 1:
            raise ValueError(f"shard_max_mb={self.shard_max_mb}, shard_max_samples={self.shard_max_samples}: both must be >= 1")


def _hashes(path: Path) -> pa.Table:
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["id", "split", "image", "sha", "phash"])


class MixStage(Stage):
    name = "mix"
    version = "2"  # 2: shards in the two-member layout (metamorph.data.shards.sample_members)
    inputs = tuple(f"curated_{f}" for f in FAMILIES)
    outputs = ("mixture",)
    config_cls = MixConfig
    description = "curated families -> training mixture by per-family ratio/cap (+ held-out copy)"

    def run(self, ctx: StageContext) -> dict[str, float]:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        cfg: MixConfig = ctx.cfg
        t0 = time.perf_counter()
        seed = ctx.seed * 1_000_003 + cfg.seed
        src = {f: ctx.input(f"curated_{f}") for f in FAMILIES}
        index = {f: read_index(src[f]) for f in FAMILIES}
        hashes = {f: _hashes(src[f] / HASHES_FILE) for f in FAMILIES}

        # cross-family guard: every family's held-out images against every family's train images;
        # labels are "{family}:{id}" so equal ids in two families cannot be confused
        guard = ContaminationGuard(phash_max_distance=cfg.phash_max_distance, near_copy_max_diff=cfg.near_copy_max_diff)
        for f in FAMILIES:
            for sid, rows in _group(hashes[f], "heldout").items():
                guard.add_heldout(f"{f}:{sid}", [r[0] for r in rows], [r[1] for r in rows])
        train_all = [
            (f"{f}:{sid}", [r[0] for r in rows], [r[1] for r in rows])
            for f in FAMILIES
            for sid, rows in sorted(_group(hashes[f], "train").items())
        ]

        def thumbs(labels: set[str]) -> dict[str, list[bytes]]:
            by_family: dict[str, list[str]] = collections.defaultdict(list)
            for label in labels:
                f, sid = label.split(":", 1)
                by_family[f].append(sid)
            out: dict[str, list[bytes]] = {}
            for f, fids in sorted(by_family.items()):
                t = pq.read_table(src[f] / HASHES_FILE, columns=["id", "image", "thumb"], filters=[("id", "in", fids)])
                for sid, _, th in sorted(zip(*(t[c].to_pylist() for c in ("id", "image", "thumb")))):
                    out.setdefault(f"{f}:{sid}", []).append(th)
            return out

        hits = guard.check(train_all, thumbs)

        out = ctx.output("mixture")
        quarantine = []
        picks = []
        stats: dict[str, float] = {}
        keys: dict[tuple[str, str], str] = {}
        seen: dict[str, str] = {}
        for f in FAMILIES:
            train = index[f].filter(pc.equal(index[f]["split"], "train"))
            ids = []
            for sid, key, source in zip(*(train[c].to_pylist() for c in ("id", "key", "source"))):
                keys[(f, sid)] = key
                if f"{f}:{sid}" in hits:
                    quarantine.append({"source": source, "id": sid, "locator": f"curated_{f}", "reason": "contamination", "detail": hits[f"{f}:{sid}"]})
                elif sid in seen:  # two families used the same source name: one key per sample in a tar
                    quarantine.append({"source": source, "id": sid, "locator": f"curated_{f}", "reason": "duplicate_id", "detail": f"also in curated_{seen[sid]}"})
                else:
                    seen[sid] = f
                    ids.append(sid)
            mix = cfg.families.get(f, FamilyMix())
            chosen = plan_family(ids, mix, seed, f)
            picks += chosen
            stats[f"available/{f}"] = len(ids)
            stats[f"selected/{f}"] = len(chosen)
            stats[f"dropped/{f}"] = train.num_rows - len(ids)
        order = interleave(picks, seed)

        readers = {f: SampleIndex(list_shards(src[f], "train")) for f in FAMILIES}
        tasks: collections.Counter = collections.Counter()
        with ShardWriter(out, "train", max_bytes=cfg.shard_max_mb * 2**20, max_samples=cfg.shard_max_samples) as w:
            for sample, images in copies(order, readers, keys):
                w.write(sample, images)
                tasks[sample.task] += 1
        for r in readers.values():
            r.close()
        ctx.record_digest(f"mixture/{INDEX_FILE}", write_index(out, w.rows))
        for shard, digest in w.digests.items():  # sha256 taken while writing (metamorph/data/digest.py)
            ctx.record_digest(f"mixture/{shard}", digest)
        for shard, n in collections.Counter(r["shard"] for r in w.rows).items():
            ctx.record_rows(f"mixture/{shard}", n)

        held_dir = out / "heldout"
        held_rows = _copy_heldout(ctx, src, held_dir, cfg)
        for shard, n in collections.Counter(r["shard"] for r in held_rows).items():
            ctx.record_rows(f"mixture/heldout/{shard}", n)

        quarantine.sort(key=lambda q: q["id"])
        n_q, digest = write_jsonl(out / QUARANTINE_FILE, quarantine)
        ctx.record_rows(f"mixture/{QUARANTINE_FILE}", n_q)
        ctx.record_digest(f"mixture/{QUARANTINE_FILE}", digest)

        stats.update(
            {
                "samples_out": len(w.rows),
                "heldout_out": len(held_rows),
                "quarantined": len(quarantine),
                "seconds": time.perf_counter() - t0,
                **guard.stats(),
            }
        )
        for task, n in sorted(tasks.items()):
            stats[f"task/{task}"] = n
        for f, n in sorted(collections.Counter(r["family"] for r in held_rows).items()):
            stats[f"heldout/{f}"] = n
        return stats


def _group(hashes: pa.Table, split: str) -> dict[str, list[tuple[str, int]]]:
    """sample id -> [(sha, phash) per image, in image order] for one split."""
    import pyarrow.compute as pc

    t = hashes.filter(pc.equal(hashes["split"], split))
    out: dict[str, list[tuple[int, str, int]]] = collections.defaultdict(list)
    for sid, i, sha, ph in zip(*(t[c].to_pylist() for c in ("id", "image", "sha", "phash"))):
        out[sid].append((i, sha, ph))
    return {sid: [(sha, ph) for _, sha, ph in sorted(rows)] for sid, rows in out.items()}


def _copy_heldout(ctx: StageContext, src: dict[str, Path], held_dir: Path, cfg: MixConfig) -> list[dict]:
    import pyarrow.compute as pc

    with ShardWriter(held_dir, "heldout", max_bytes=cfg.shard_max_mb * 2**20, max_samples=cfg.shard_max_samples) as w:
        for f in FAMILIES:
            index = read_index(src[f])
            keys = index.filter(pc.equal(index["split"], "heldout"))["key"].to_pylist()
            with SampleIndex(list_shards(src[f], "heldout")) as reader:
                for key in keys:  # index order: sorted by id, as the curation stage wrote them
                    w.write(*reader.get(key))
    ctx.record_digest(f"mixture/heldout/{INDEX_FILE}", write_index(held_dir, w.rows))
    for shard, digest in w.digests.items():
        ctx.record_digest(f"mixture/heldout/{shard}", digest)
    return w.rows
