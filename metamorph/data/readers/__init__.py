"""Readers of the upstream dataset formats the curation stages consume, by format name.

    python -c "from metamorph.data.readers import READERS; print(sorted(READERS))"

Each reader is two functions (see ``base``): ``plan(src, records_per_unit) -> units`` runs on the
driver and only lists work; ``read(src, unit, unit_idx) -> RawRecord...`` runs in a worker.
``FAMILY_FORMATS`` says which formats each curation family accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

from metamorph.data.readers import howto100m, img2dataset, instructpix2pix, llava, parquet, ssv2, videoqa, viscot
from metamorph.data.readers.base import RAW_SCHEMA, RawRecord, Reject, SourceConfig, raw_table


@dataclass(frozen=True)
class Reader:
    name: str
    plan: Callable[[SourceConfig, int], list[dict[str, Any]]]
    read: Callable[[SourceConfig, dict[str, Any], int], Iterator[RawRecord]]
    suffixes: tuple[str, ...]  # the annotation/shard files a directory source holds (for fingerprints)


def _reader(name: str, mod: ModuleType, suffixes: tuple[str, ...]) -> Reader:
    return Reader(name=name, plan=mod.plan, read=mod.read, suffixes=suffixes)


READERS: dict[str, Reader] = {
    "llava": _reader("llava", llava, (".jsonl", ".json")),
    "videoqa": _reader("videoqa", videoqa, (".jsonl",)),
    "img2dataset": _reader("img2dataset", img2dataset, (".tar",)),
    "parquet": _reader("parquet", parquet, (".parquet",)),
    "ssv2": _reader("ssv2", ssv2, (".json",)),
    "howto100m": _reader("howto100m", howto100m, (".csv",)),
    "viscot": _reader("viscot", viscot, (".jsonl",)),
    "instructpix2pix": _reader("instructpix2pix", instructpix2pix, (".parquet",)),
}

FAMILY_FORMATS: dict[str, tuple[str, ...]] = {
    "understanding": ("llava", "videoqa"),
    "generation": ("img2dataset", "parquet"),
    "video": ("ssv2", "howto100m"),
    "visual_thinking": ("viscot",),
    "image_edit": ("instructpix2pix",),
}


def read_source(src: SourceConfig, records_per_unit: int = 256) -> Iterator[RawRecord]:
    """Every record of one source in order, in-process (tests, small sources, the bench baseline)."""
    reader = READERS[src.format]
    for i, unit in enumerate(reader.plan(src, records_per_unit)):
        yield from reader.read(src, unit, i)


__all__ = ["READERS", "FAMILY_FORMATS", "Reader", "RawRecord", "Reject", "SourceConfig", "RAW_SCHEMA", "raw_table", "read_source"]
