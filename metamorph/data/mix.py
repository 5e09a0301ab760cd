"""The training mixture: per-family sampling rates and caps over curated train samples, by seed.

    python -c "from metamorph.data.mix import FamilyMix, plan_family; print(plan_family(['a', 'b', 'c'], FamilyMix(ratio=2.0, max_samples=5), seed=0))"

Per family: ``ratio`` scales what the family offers (0.5 takes a seeded half, 2.0 takes every
sample twice: upsampling a small family), then ``max_samples`` caps it (the paper's ablations:
generation capped at 5k or 200k with all understanding data). The selected samples of all
families are interleaved in one seeded order, so a streaming trainer sees every family
throughout an epoch. Same inputs and seed, same mixture, byte for byte.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from metamorph.data.schema import Sample
from metamorph.data.shards import sample_from_members

if TYPE_CHECKING:
    import numpy as np

FAMILIES = ("understanding", "generation", "video", "visual_thinking", "image_edit")


@dataclass(kw_only=True)
class FamilyMix:
    ratio: float = 1.0  # share of the family's curated train samples to take; > 1 repeats samples (upsampling)
    max_samples: Optional[int] = None  # cap after the ratio (None: no cap; 0 leaves the family out)

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 100.0:
            raise ValueError(f"ratio={self.ratio}: use 0..100 (a sampling rate; 1.0 takes every sample once)")
        if self.max_samples is not None and self.max_samples < 0:
            raise ValueError(f"max_samples={self.max_samples}: use >= 0 or null for no cap")


@dataclass(frozen=True)
class Pick:
    family: str
    id: str  # the curated sample id
    repeat: int  # 0 for the first copy; k > 0 for upsampled copies (written as "{id}-rep{k}")

    @property
    def out_id(self) -> str:
        return self.id if self.repeat == 0 else f"{self.id}-rep{self.repeat}"


def _rng(seed: int, *salt: str) -> np.random.Generator:
    import numpy as np

    h = hashlib.sha256("/".join((str(seed),) + salt).encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def plan_family(ids: list[str], mix: FamilyMix, seed: int, family: str = "") -> list[Pick]:
    """The samples one family contributes: ``round(ratio * len(ids))`` capped at ``max_samples``.

    Drawn from a seeded permutation of the sorted ids, so the pick does not depend on input order
    and a smaller cap is a prefix of a larger one (the 5k mixture is inside the 200k one)."""
    ids = sorted(ids)
    n = int(round(mix.ratio * len(ids)))
    if mix.max_samples is not None:
        n = min(n, mix.max_samples)
    if n == 0 or not ids:
        return []
    perm = _rng(seed, "family", family).permutation(len(ids))
    picks: list[Pick] = []
    for k in range(n):
        picks.append(Pick(family=family, id=ids[perm[k % len(ids)]], repeat=k // len(ids)))
    return picks


def interleave(picks: list[Pick], seed: int) -> list[Pick]:
    """All families' picks in one seeded order (sorted first: independent of how they were listed)."""
    picks = sorted(picks, key=lambda p: (p.family, p.id, p.repeat))
    perm = _rng(seed, "order").permutation(len(picks))
    return [picks[i] for i in perm]


class SampleIndex:
    """Random access to the samples of curated shards by key, via the tar headers' offsets
    (one header scan, no extraction; the mixture reads samples in a shuffled order)."""

    def __init__(self, shards: list[Path]) -> None:
        self._where: dict[str, dict[str, tuple[Path, int, int]]] = {}
        for shard in shards:
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, _, ext = m.name.partition(".")
                    self._where.setdefault(key, {})[ext] = (shard, m.offset_data, m.size)
        self._files: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _read(self, loc: tuple[Path, int, int]) -> bytes:
        path, off, size = loc
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(off)  # type: ignore[attr-defined]
        return f.read(size)  # type: ignore[attr-defined]

    def get(self, key: str) -> tuple[Sample, list[bytes]]:
        return sample_from_members({suffix: self._read(loc) for suffix, loc in self._where[key].items()})

    def close(self) -> None:
        for f in self._files.values():
            f.close()  # type: ignore[attr-defined]
        self._files.clear()

    def __enter__(self) -> "SampleIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def copies(picks: list[Pick], readers: dict[str, SampleIndex], keys: dict[tuple[str, str], str]) -> Iterator[tuple[Sample, list[bytes]]]:
    """The picked samples in order; repeats get their own id (and so their own shard key)."""
    for p in picks:
        sample, images = readers[p.family].get(keys[(p.family, p.id)])
        if p.repeat:
            sample.id = p.out_id
            sample.meta = {**sample.meta, "repeat_of": p.id}
        yield sample, images
