"""Field metadata of config dataclasses: which fields are operational (they change speed or
bookkeeping, never the result) and so stay out of a stage's cache key.

    python -c "from metamorph.train.config import TrainConfig; from metamorph.fields import operational_paths; print(sorted(operational_paths(TrainConfig())))"

A field declares it where it is defined, beside its comment:

    log_every: int = field(default=10, metadata=operational())

so the exclusion travels with the field (a rename cannot leave a stale string behind) and a
nested config (``train.log_every``) is excluded wherever it is used. An operational field that
holds a dataclass is excluded as a whole; a subclass that only changes a field's default keeps
its base's mark. Metadata keys are checked: a misspelt key fails ``operational_paths``, naming
the field.
"""

from __future__ import annotations

import dataclasses
from typing import Any

OPERATIONAL = "operational"
KNOWN_KEYS = frozenset({OPERATIONAL})


def operational() -> dict[str, bool]:
    """``dataclasses.field(metadata=...)`` for a field outside the cache key."""
    return {OPERATIONAL: True}


def is_operational(f: dataclasses.Field) -> bool:
    unknown = set(f.metadata) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"config field {f.name!r}: unknown metadata key(s) {sorted(unknown)}; "
                         f"known: {sorted(KNOWN_KEYS)} (use metamorph.fields.operational())")
    return bool(f.metadata.get(OPERATIONAL))


def operational_paths(cfg: Any, prefix: str = "") -> frozenset[str]:
    """Dotted paths of every operational field of the config instance ``cfg``, nested dataclasses
    included (``train.log_every``)."""
    if not dataclasses.is_dataclass(cfg):
        return frozenset()
    out: set[str] = set()
    for f in dataclasses.fields(cfg):
        path = prefix + f.name
        if is_operational(f) or _marked_in_base(type(cfg), f.name):
            out.add(path)
        else:
            out |= operational_paths(getattr(cfg, f.name), path + ".")
    return frozenset(out)


def _marked_in_base(cls: type, name: str) -> bool:
    """A base dataclass marks field ``name`` operational (the subclass redeclared its default)."""
    for base in cls.__mro__[1:]:
        if dataclasses.is_dataclass(base):
            f = next((f for f in dataclasses.fields(base) if f.name == name), None)
            if f is not None and is_operational(f):
                return True
    return False
