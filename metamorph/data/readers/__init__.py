"""Readers of the upstream dataset formats the curation stages consume, by format name.

    python -c "from metamorph.data.readers import READERS; print(sorted(READERS))"

A reader is one module with ``plan(src, records_per_unit) -> units`` (runs on the driver and only
lists work), ``read(src, unit, unit_idx) -> RawRecord...`` (runs in a worker), and four constants:
``KIND`` (the converter in ``metamorph.data.curate``), ``FAMILY`` (the curation stage that reads
it), ``SUFFIXES`` (the annotation/shard files a directory source holds) and ``FIELDS`` (record
keys a source may rename with ``fields``, and their defaults). Adding a format is that module and
one line in ``FORMATS`` (see docs/CONTRACTS.md, "Adding a format").
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

from metamorph.data.readers.base import RawRecord, Reject, SourceConfig, raw_table


@dataclass(frozen=True)
class Reader:
    name: str
    plan: Callable[[SourceConfig, int], list[dict[str, Any]]]
    read: Callable[[SourceConfig, dict[str, Any], int], Iterator[RawRecord]]
    family: str
    suffixes: tuple[str, ...]  # the annotation/shard files a directory source holds (for fingerprints)
    fields: dict[str, str]  # renamable record keys and their defaults

    @classmethod
    def of(cls, name: str, mod: ModuleType) -> "Reader":
        return cls(name=name, plan=mod.plan, read=mod.read, family=mod.FAMILY, suffixes=mod.SUFFIXES, fields=dict(mod.FIELDS))


# The one table of formats: format name (a source's ``format``) -> its reader module in this
# package. A new format is its module plus one line here.
FORMATS: dict[str, str] = {
    "llava": "llava",  # LLaVA / Cambrian image and video conversations
    "videoqa": "llava",  # the same reader, for configs that name video QA apart
    "img2dataset": "img2dataset",
    "parquet": "parquet",
    "ssv2": "ssv2",
    "howto100m": "howto100m",
    "viscot": "viscot",
    "instructpix2pix": "instructpix2pix",
    "edit_jsonl": "edit_jsonl",
}

READERS: dict[str, Reader] = {
    name: Reader.of(name, importlib.import_module(f"{__name__}.{module}")) for name, module in FORMATS.items()
}

FAMILY_FORMATS: dict[str, tuple[str, ...]] = {
    family: tuple(n for n, r in READERS.items() if r.family == family)
    for family in ("understanding", "generation", "video", "visual_thinking", "image_edit")
}


def check_source(src: SourceConfig, where: str) -> None:
    """Config mistakes a reader can see before any work: unknown format, unknown ``fields`` keys."""
    if src.format not in READERS:
        raise ValueError(f"{where}.format={src.format!r}: use one of {sorted(READERS)}")
    unknown = sorted(set(src.fields) - set(READERS[src.format].fields))
    if unknown:
        known = READERS[src.format].fields
        raise ValueError(f"{where}.fields: {unknown} unknown for format {src.format!r}; it renames {sorted(known) or 'nothing'}")


def read_source(src: SourceConfig, records_per_unit: int = 256) -> Iterator[RawRecord]:
    """Every record of one source in order, in-process (tests, small sources, the bench baseline)."""
    reader = READERS[src.format]
    for i, unit in enumerate(reader.plan(src, records_per_unit)):
        yield from reader.read(src, unit, i)



__all__ = ["FORMATS", "READERS", "FAMILY_FORMATS", "Reader", "RawRecord", "Reject", "SourceConfig", "raw_table", "read_source", "check_source"]
