"""Content-addressed stage outputs: cache keys, the `_SUCCESS.json` manifest, atomic promotion.

    python -c "from pipelines.cache import read_manifest; print(read_manifest('runs/world/KEY'))"

Layout under the run root:

    {run_root}/{stage}/{key}/            promoted output; trusted only with _SUCCESS.json inside
    {run_root}/{stage}/{key}.tmp/        the attempt in progress (never trusted, wiped on retry)
    {run_root}/{stage}/{key}.ckpt/       checkpoints of resumable stages (kept across attempts)

A stage writes into ``.tmp``; on success it is renamed to ``{key}`` and the manifest is written
last (itself via a temp file + rename), so a crash at any instant leaves nothing that looks
complete: either no dir, a dir without manifest, or a dir whose manifest lists exactly its files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pipelines.config import to_plain

MANIFEST = "_SUCCESS.json"
KEY_LEN = 16  # hex chars of sha256: 64 bits, collision-free for any realistic number of runs


def cache_config(cfg: Any, operational: frozenset[str]) -> Any:
    """The stage config as plain data with operational (result-neutral) fields removed."""
    plain = to_plain(cfg)
    for path in operational:
        parts = path.split(".")
        node = plain
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return plain


def cache_key(
    stage_name: str,
    version: str,
    cfg_plain: Any,
    upstream: dict[str, str],
    external: dict[str, Any],
) -> str:
    payload = json.dumps(
        {
            "stage": stage_name,
            "version": version,
            "config": cfg_plain,
            "upstream": dict(sorted(upstream.items())),
            "external": external,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:KEY_LEN]


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Cheap fingerprint of an external file or directory tree: sizes and mtimes, not content."""
    p = Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    if p.is_file():
        st = p.stat()
        return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    h = hashlib.sha256()
    n = 0
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        n += 1
    return {"path": str(p), "files": n, "digest": h.hexdigest()[:16]}


def stage_dirs(run_root: Path, stage: str, key: str) -> tuple[Path, Path, Path]:
    base = run_root / stage
    return base / key, base / f"{key}.tmp", base / f"{key}.ckpt"


def read_manifest(out_dir: str | Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a torn manifest cannot exist (atomic rename), but never trust garbage


def is_complete(out_dir: str | Path, key: str | None = None) -> bool:
    m = read_manifest(out_dir)
    return m is not None and (key is None or m.get("key") == key)


def list_files(root: Path, row_counts: dict[str, int]) -> list[dict[str, Any]]:
    files = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = str(f.relative_to(root))
        entry: dict[str, Any] = {"path": rel, "bytes": f.stat().st_size}
        if rel in row_counts:
            entry["rows"] = row_counts[rel]
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq

                entry["rows"] = pq.ParquetFile(f).metadata.num_rows
            except Exception:  # a stage may write a non-table .parquet; counts are best effort
                pass
        files.append(entry)
    return files


def prepare_attempt(run_root: Path, stage: str, key: str) -> tuple[Path, Path, Path]:
    """Fresh temp dir for an attempt; an unmanifested final dir from a crash is removed."""
    final, tmp, ckpt = stage_dirs(run_root, stage, key)
    if tmp.exists():
        shutil.rmtree(tmp)
    if final.exists() and not is_complete(final, key):
        shutil.rmtree(final)
    tmp.mkdir(parents=True)
    return final, tmp, ckpt


def promote(
    tmp: Path,
    final: Path,
    manifest: dict[str, Any],
    row_counts: dict[str, int],
) -> dict[str, Any]:
    """Rename tmp -> final, then write the manifest last (atomically). Returns the manifest."""
    if final.exists():  # a forced rerun replaces the previous output of the same key
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    manifest = dict(manifest)
    manifest["files"] = list_files(final, row_counts)
    manifest["finished_at"] = time.time()
    part = final / (MANIFEST + ".part")
    part.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    with open(part, "rb") as f:
        os.fsync(f.fileno())
    os.replace(part, final / MANIFEST)
    return manifest


def verify(out_dir: Path) -> list[str]:
    """Problems with a promoted dir: files listed in the manifest missing or of the wrong size."""
    m = read_manifest(out_dir)
    if m is None:
        return [f"{out_dir}: no manifest"]
    problems = []
    for entry in m.get("files", []):
        p = out_dir / entry["path"]
        if not p.exists():
            problems.append(f"{p}: listed in manifest but missing")
        elif p.stat().st_size != entry["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, manifest says {entry['bytes']}")
    return problems


_GIT_SHA: str | None = None


def git_sha() -> str:
    global _GIT_SHA
    if _GIT_SHA is None:
        try:
            repo = Path(__file__).resolve().parents[1]
            _GIT_SHA = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5
            ).stdout.strip() or "unknown"
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=repo, capture_output=True, text=True, timeout=5,
            ).stdout.strip()
            if dirty and _GIT_SHA != "unknown":
                _GIT_SHA += "-dirty"
        except (OSError, subprocess.SubprocessError):
            _GIT_SHA = "unknown"
    return _GIT_SHA


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return to_plain(obj)
    return obj
