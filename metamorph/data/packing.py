"""Sequence packing into fixed-length rows, their Parquet format, a reader, and ``collate``.

    python -m metamorph.data.packing runs/tokenize/KEY/tokenized      # prints rows, efficiency, a batch

Samples (rendered by ``metamorph.data.chat``) are packed whole into rows of exactly
``max_length`` positions by first-fit over a window of open rows: a sample goes into the first
open row with room, else opens a new one; when more than ``window`` rows are open the oldest is
closed. A sample is never split across rows, so an image block is never cut; a sample longer than
``max_length`` is first truncated at the last position that does not fall inside an image block
(``truncate``), or dropped if what is left has no training target. Position ids restart at 0 for
every packed sample and ``segment_ids`` number the samples 1..k (0 = padding) so the model can
mask attention across samples. The rest of a row is padding (pad id, label -100).

One Parquet row = one packed row; the columns are fixed in docs/CONTRACTS.md ("Tokenized rows"),
plus ``sample_ids`` (the packed samples' ids, for tracing a row back to the mixture). Files are
``part-NNNNN.parquet`` with ``row_group_size`` rows per row group (the training reader's resume
unit), written in a deterministic order.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from metamorph.data.chat import IGNORE, Rendered
from metamorph.data.digest import FileDigest, HashingFile, hashing_open

PART_GLOB = "part-*.parquet"
SCHEMA = pa.schema(
    [
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("position_ids", pa.list_(pa.int32())),
        ("segment_ids", pa.list_(pa.int32())),
        ("visual_mask", pa.list_(pa.bool_())),
        ("response_visual_mask", pa.list_(pa.bool_())),
        ("vision_feats", pa.binary()),  # fp16 [K, D] row-major, K = sum(visual_mask), position order
        ("num_tokens", pa.int32()),
        ("sample_ids", pa.list_(pa.string())),
    ]
)
FEATS_DTYPE = np.float16
BATCH_KEYS = ("input_ids", "labels", "position_ids", "segment_ids", "visual_mask", "response_visual_mask", "vision_feats")


# ---- samples and truncation ------------------------------------------------------------------


@dataclass
class PackSample:
    """One rendered sample ready to pack: its token lists and its images' fp16 features."""

    id: str
    input_ids: list[int]
    labels: list[int]
    visual_mask: list[bool]
    response_visual_mask: list[bool]
    vision_feats: bytes = b""  # fp16 [K, D] for the sample's K visual positions, in order

    def __len__(self) -> int:
        return len(self.input_ids)

    @classmethod
    def from_rendered(cls, sample_id: str, r: Rendered, vision_feats: bytes = b"") -> "PackSample":
        return cls(
            id=sample_id,
            input_ids=list(r.input_ids),
            labels=list(r.labels),
            visual_mask=list(r.visual_mask),
            response_visual_mask=list(r.response_visual_mask),
            vision_feats=vision_feats,
        )


def has_targets(labels: Sequence[int], response_visual_mask: Sequence[bool]) -> bool:
    # labels[0] is never a target (nothing precedes it), so only positions 1.. count
    return any(x != IGNORE for x in labels[1:]) or any(response_visual_mask)


def truncate(r: Rendered, max_length: int) -> tuple[Rendered | None, str]:
    """Fit ``r`` into ``max_length``: ("ok" | "truncated", sample) or (None, "dropped_*").

    The cut is the largest length <= max_length that keeps every image block whole (it falls
    before an ``<image_start>`` or after an ``<image_end>``); images past the cut are gone, so
    the caller keeps only ``len(result.image_starts)`` images. A sample whose kept part has no
    target (CE label or response visual position) is dropped.
    """
    if not has_targets(r.labels, r.response_visual_mask):
        return None, "dropped_no_targets"
    if len(r) <= max_length:
        return r, "ok"
    cut = max_length
    for i in range(len(r.image_starts)):
        s, e = r.image_span(i)
        if s < cut < e:  # the cut would split this image block: cut before it
            cut = s
            break
    n_images = sum(1 for i in range(len(r.image_starts)) if r.image_span(i)[1] <= cut)
    out = Rendered(
        input_ids=r.input_ids[:cut],
        labels=r.labels[:cut],
        visual_mask=r.visual_mask[:cut],
        response_visual_mask=r.response_visual_mask[:cut],
        image_starts=r.image_starts[:n_images],
        image_roles=r.image_roles[:n_images],
        n_visual=r.n_visual,
    )
    if not has_targets(out.labels, out.response_visual_mask):
        return None, "dropped_too_long"
    return out, "truncated"


# ---- packing ---------------------------------------------------------------------------------


def build_row(samples: Sequence[PackSample], max_length: int, pad_id: int) -> dict[str, Any]:
    """Concatenate ``samples`` into one padded row dict (the Parquet columns)."""
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    segment_ids: list[int] = []
    visual_mask: list[bool] = []
    response_visual_mask: list[bool] = []
    for k, s in enumerate(samples, start=1):
        n = len(s)
        input_ids += s.input_ids
        labels += s.labels
        position_ids += range(n)
        segment_ids += [k] * n
        visual_mask += s.visual_mask
        response_visual_mask += s.response_visual_mask
    used = len(input_ids)
    if used > max_length:
        raise ValueError(f"row of {used} positions exceeds max_length={max_length}")
    pad = max_length - used
    return {
        "input_ids": input_ids + [pad_id] * pad,
        "labels": labels + [IGNORE] * pad,
        "position_ids": position_ids + [0] * pad,
        "segment_ids": segment_ids + [0] * pad,
        "visual_mask": visual_mask + [False] * pad,
        "response_visual_mask": response_visual_mask + [False] * pad,
        "vision_feats": b"".join(s.vision_feats for s in samples),
        "num_tokens": used,
        "sample_ids": [s.id for s in samples],
    }


@dataclass
class _Bin:
    samples: list[PackSample] = field(default_factory=list)
    used: int = 0


class Packer:
    """Streaming first-fit packer; ``add`` and ``flush`` return finished row dicts in order.

    ``window`` bounds the open rows (memory and how far a sample can move from its input order);
    measured on the toy mixture: window 64 fills 512-position rows to 96.4% (tiny), window 16
    fills 256-position rows to 95.0% (smoke).
    """

    def __init__(self, max_length: int, pad_id: int, window: int = 64):
        if max_length <= 0 or window <= 0:
            raise ValueError(f"max_length={max_length} and window={window} must be > 0")
        self.max_length, self.pad_id, self.window = max_length, pad_id, window
        self._open: list[_Bin] = []

    def add(self, sample: PackSample) -> list[dict[str, Any]]:
        n = len(sample)
        if n > self.max_length:
            raise ValueError(f"sample {sample.id} has {n} positions > max_length={self.max_length}: truncate() it first")
        out = []
        for i, b in enumerate(self._open):
            if b.used + n <= self.max_length:
                b.samples.append(sample)
                b.used += n
                if b.used == self.max_length:
                    out.append(self._close(i))
                return out
        b = _Bin([sample], n)
        self._open.append(b)
        if b.used == self.max_length:
            out.append(self._close(len(self._open) - 1))
        elif len(self._open) > self.window:
            out.append(self._close(0))
        return out

    def flush(self) -> list[dict[str, Any]]:
        out = [build_row(b.samples, self.max_length, self.pad_id) for b in self._open]
        self._open = []
        return out

    def _close(self, i: int) -> dict[str, Any]:
        b = self._open.pop(i)
        return build_row(b.samples, self.max_length, self.pad_id)


def pack(samples: Sequence[PackSample], max_length: int, pad_id: int, window: int = 64) -> list[dict[str, Any]]:
    """All of ``samples`` packed (a convenience over ``Packer``)."""
    p = Packer(max_length, pad_id, window)
    rows = [r for s in samples for r in p.add(s)]
    return rows + p.flush()


@dataclass
class PackingStats:
    """Counts for the manifest and MLflow; fed every sample outcome and every written row."""

    max_length: int
    n_samples: int = 0  # samples read
    n_samples_packed: int = 0
    n_truncated: int = 0
    n_dropped_too_long: int = 0
    n_dropped_no_targets: int = 0
    n_rows: int = 0
    nonpad_tokens: int = 0
    visual_tokens: int = 0
    response_visual_tokens: int = 0
    ce_tokens: int = 0

    def add_sample(self, status: str) -> None:
        self.n_samples += 1
        if status == "truncated":
            self.n_truncated += 1
        elif status == "dropped_too_long":
            self.n_dropped_too_long += 1
        elif status == "dropped_no_targets":
            self.n_dropped_no_targets += 1
        elif status != "ok":
            raise ValueError(f"unknown sample status {status!r}")

    def add_row(self, row: dict[str, Any]) -> None:
        self.n_rows += 1
        self.n_samples_packed += len(row["sample_ids"])
        self.nonpad_tokens += int(row["num_tokens"])
        self.visual_tokens += sum(row["visual_mask"])
        self.response_visual_tokens += sum(row["response_visual_mask"])
        self.ce_tokens += sum(1 for x in row["labels"] if x != IGNORE)

    def as_dict(self, n_visual: int | None = None) -> dict[str, float]:
        total = self.n_rows * self.max_length
        d: dict[str, float] = {
            "n_samples": self.n_samples,
            "n_samples_packed": self.n_samples_packed,
            "n_rows": self.n_rows,
            "total_tokens": total,
            "nonpad_tokens": self.nonpad_tokens,
            "packing_efficiency": self.nonpad_tokens / total if total else 0.0,
            "text_tokens": self.nonpad_tokens - self.visual_tokens,
            "visual_tokens": self.visual_tokens,
            "response_visual_tokens": self.response_visual_tokens,
            "ce_tokens": self.ce_tokens,
            "n_truncated": self.n_truncated,
            "n_dropped": self.n_dropped_too_long + self.n_dropped_no_targets,
            "n_dropped_too_long": self.n_dropped_too_long,
            "n_dropped_no_targets": self.n_dropped_no_targets,
            "samples_per_row": self.n_samples_packed / self.n_rows if self.n_rows else 0.0,
        }
        if n_visual:
            d["n_images"] = self.visual_tokens // n_visual
        return d


# ---- Parquet ---------------------------------------------------------------------------------


class PartWriter:
    """Writes rows to ``part-NNNNN.parquet`` files of ``rows_per_part`` rows, ``row_group_size`` per group.

    ``metadata`` (str -> str) goes into every file's schema metadata (max_length, feature dim...).
    """

    def __init__(self, out_dir: str | Path, row_group_size: int, rows_per_part: int, metadata: dict[str, str] | None = None):
        if row_group_size <= 0 or rows_per_part <= 0 or rows_per_part % row_group_size:
            raise ValueError(
                f"rows_per_part={rows_per_part} must be a positive multiple of row_group_size={row_group_size}"
            )
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.row_group_size, self.rows_per_part = row_group_size, rows_per_part
        self.schema = SCHEMA.with_metadata({k: str(v) for k, v in (metadata or {}).items()})
        self.parts: list[tuple[str, int]] = []  # (file name, rows) of closed parts
        self.digests: dict[str, FileDigest] = {}  # file name -> sha256 of a closed part, taken while writing
        self._writer: pq.ParquetWriter | None = None
        self._file: HashingFile | None = None
        self._in_part = 0
        self._pending: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._pending.append(row)
        if len(self._pending) == self.row_group_size:
            self._flush_group()

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            name = f"part-{len(self.parts):05d}.parquet"
            # zstd: the int columns shrink ~5x; fp16 features barely compress but cost little
            self._file = hashing_open(self.out_dir / name)
            self._writer = pq.ParquetWriter(self._file, self.schema, compression="zstd")
            self.parts.append((name, 0))
        table = pa.Table.from_pylist(self._pending, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.row_group_size)
        name, n = self.parts[-1]
        self.parts[-1] = (name, n + len(self._pending))
        self._in_part += len(self._pending)
        self._pending = []
        if self._in_part >= self.rows_per_part:
            self._close_part()
            self._in_part = 0

    def _close_part(self) -> None:
        assert self._writer is not None and self._file is not None
        self._writer.close()  # writes the footer into the file object, which stays open
        self._file.close()
        self.digests[self.parts[-1][0]] = self._file.digest()
        self._writer = self._file = None

    def close(self) -> list[tuple[str, int]]:
        self._flush_group()
        if self._writer is not None:
            self._close_part()
        return list(self.parts)

    def __enter__(self) -> "PartWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def list_parts(path: str | Path) -> list[Path]:
    """The part files of a tokenized dir (or ``[path]`` for a single file), in order."""
    path = Path(path)
    return sorted(path.glob(PART_GLOB)) if path.is_dir() else [path]


def read_metadata(path: str | Path) -> dict[str, str]:
    """Schema metadata of the first part (max_length, feature_dim, n_visual, pad_id, ...)."""
    parts = list_parts(path)
    if not parts:
        raise FileNotFoundError(f"no {PART_GLOB} under {path}")
    meta = pq.read_schema(parts[0]).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items()}


def iter_row_groups(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
    """Every row group of every part, in order (one Arrow table each)."""
    for part in list_parts(path):
        f = pq.ParquetFile(part)
        for i in range(f.num_row_groups):
            yield f.read_row_group(i, columns=list(columns) if columns else None)


def iter_rows(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every row as a dict of Python values (lists, bytes), in file order."""
    for table in iter_row_groups(path, columns):
        yield from table.to_pylist()


def row_features(row: dict[str, Any], feature_dim: int | None = None) -> np.ndarray:
    """A row's features as float16 [K, D] (K = its visual positions)."""
    k = int(sum(row["visual_mask"]))
    buf = np.frombuffer(row["vision_feats"], dtype=FEATS_DTYPE)
    if k == 0:
        if buf.size:
            raise ValueError("row has feature bytes but no visual positions")
        return buf.reshape(0, feature_dim or 0)
    if buf.size % k:
        raise ValueError(f"row has {buf.size} feature values for {k} visual positions")
    return buf.reshape(k, buf.size // k)


def collate(rows: Sequence[dict[str, Any]] | pa.Table, feature_dim: int | None = None) -> dict[str, torch.Tensor]:
    """Rows (dicts, or an Arrow table) -> the model's batch dict (docs/CONTRACTS.md).

    ``vision_feats`` is float32 [K, D] over all rows in row-major position order, so
    ``embeds[visual_mask] = projector(vision_feats)`` lines up. ``feature_dim`` only matters for
    a batch without any image (it gives the empty tensor its D).
    """
    if isinstance(rows, (pa.Table, pa.RecordBatch)):
        rows = rows.to_pylist()
    if not rows:
        raise ValueError("collate needs at least one row")
    batch: dict[str, torch.Tensor] = {}
    for key in ("input_ids", "labels", "position_ids", "segment_ids"):
        batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
    for key in ("visual_mask", "response_visual_mask"):
        batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.bool)
    feats = [row_features(r, feature_dim) for r in rows]
    dims = {f.shape[1] for f in feats if f.shape[0]}
    if len(dims) > 1:
        raise ValueError(f"rows disagree on the feature dim: {sorted(dims)}")
    d = dims.pop() if dims else (feature_dim or 0)
    if feature_dim is not None and d != feature_dim:
        raise ValueError(f"rows have feature dim {d}, expected {feature_dim}")
    nonempty = [f for f in feats if f.shape[0]]
    arr = np.concatenate(nonempty, axis=0) if nonempty else np.zeros((0, d), dtype=FEATS_DTYPE)
    batch["vision_feats"] = torch.from_numpy(arr.astype(np.float32))
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="a tokenized dir (the tokenize stage's `tokenized` output)")
    args = ap.parse_args()
    meta = read_metadata(args.path)
    n_rows = nonpad = 0
    for t in iter_row_groups(args.path, columns=["num_tokens"]):
        n_rows += t.num_rows
        nonpad += sum(t.column("num_tokens").to_pylist())
    L = int(meta["max_length"])
    print(json.dumps(meta, indent=2))
    print(f"{n_rows} rows of {L}: packing efficiency {nonpad / max(1, n_rows * L):.3f}")
    rows = [r for _, r in zip(range(2), iter_rows(args.path))]
    for k, v in collate(rows, int(meta["feature_dim"])).items():
        print(f"  {k:22} {tuple(v.shape)} {v.dtype}")


if __name__ == "__main__":
    main()
