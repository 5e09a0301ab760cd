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
import errno
import hashlib
import itertools
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

# shutil and subprocess are imported in the functions that use them: a remembered `plan`
# (pipelines/memo.py) loads this module and nothing it does not need.

log = logging.getLogger(__name__)

MANIFEST = "_SUCCESS.json"
KEY_LEN = 16  # hex chars of sha256: 64 bits, collision-free for any realistic number of runs


def cache_config(cfg: Any) -> Any:
    """The stage config as plain data with operational (result-neutral) fields removed: those
    declared with ``metamorph.fields.operational()`` field metadata, at any depth."""
    from metamorph.fields import operational_paths
    from pipelines.config import to_plain

    plain = to_plain(cfg)
    for path in sorted(operational_paths(cfg)):
        parts = path.split(".")
        node = plain
        for p in parts[:-1]:
            node = node[p]
        del node[parts[-1]]  # a KeyError here would be a bug in to_plain, not a config mistake
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_files(
    root: Path,
    row_counts: dict[str, int],
    sync: bool = False,
    digests: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every file under ``root`` (but the manifest) with bytes, sha256 and rows where known.

    The sha256 of a file our writers own was taken while writing (``digests``: relative path ->
    {"sha256", "bytes"}, from ``StageContext.record_digest`` and metamorph/data/digest.py) and is
    used as is when the size on disk still matches: ``"hashed": "writing"``. Files written by
    code that takes only a path (``save_pretrained``, PyAV, the toy world's renderers) are read
    once here: ``"hashed": "promote"``. With ``sync`` each file and every directory is fsynced, so
    the manifest written after this never describes data that a power loss could still take back.
    """
    digests = digests or {}
    files = []
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = str(f.relative_to(root))
        size = f.stat().st_size
        known = digests.get(rel)
        if known is not None and known["bytes"] == size:
            entry: dict[str, Any] = {"path": rel, "bytes": size, "sha256": known["sha256"], "hashed": "writing"}
        else:  # third-party writer (or rewritten after its digest was taken): a second read
            if known is not None:
                log.warning("%s: %d bytes on disk, %d when its digest was taken; hashing it again", f, size, known["bytes"])
            entry = {"path": rel, "bytes": size, "sha256": _sha256(f), "hashed": "promote"}
        if sync:
            _fsync(f)
        if rel in row_counts:
            entry["rows"] = row_counts[rel]
        elif f.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq

                entry["rows"] = pq.ParquetFile(f).metadata.num_rows
            except Exception:  # a stage may write a non-table .parquet; counts are best effort
                pass
        files.append(entry)
    if sync:
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            _fsync(d, directory=True)
        _fsync(root, directory=True)
    return files


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    part = out_dir / (MANIFEST + ".part")
    part.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    _fsync(part)
    os.replace(part, out_dir / MANIFEST)
    _fsync(out_dir, directory=True)


def _leftovers(final: Path) -> list[Path]:
    """``{key}.old-*`` dirs of an interrupted replacement (the previous output of ``final``)."""
    return sorted(final.parent.glob(f"{final.name}.old-*"))


def has_leftovers(final: Path) -> bool:
    return bool(_leftovers(Path(final)))


def recover(run_root: Path, stage: str, key: str) -> str | None:
    """Finish or undo a replacement a crash interrupted. Call holding the key's lock.

    A crash between "old output renamed aside" and "new output renamed into place" leaves no
    ``{key}``, a complete ``{key}.tmp`` (its manifest is written before the swap) and the old
    output in ``{key}.old-*``: the new one is promoted. A complete ``{key}.tmp`` with no ``{key}``
    (killed right after the manifest) is promoted too. Then ``.old-*`` leftovers are removed.
    Returns what was done, or None.
    """
    import shutil

    final, tmp, _ = stage_dirs(run_root, stage, key)
    did = []
    if not final.exists() and tmp.is_dir() and is_complete(tmp, key) and not verify(tmp):
        os.replace(tmp, final)
        _fsync(final.parent, directory=True)
        did.append(f"promoted the finished attempt {tmp.name}")
    for old in _leftovers(final):
        if not final.exists() and is_complete(old, key) and not verify(old):
            os.replace(old, final)
            _fsync(final.parent, directory=True)
            did.append(f"restored the previous output from {old.name}")
            continue
        shutil.rmtree(old, ignore_errors=True)
        did.append(f"removed {old.name}")
    return "; ".join(did) or None


def prepare_attempt(run_root: Path, stage: str, key: str) -> tuple[Path, Path, Path]:
    """Fresh temp dir for an attempt; an unmanifested final dir from a crash is removed.

    Call holding the key's lock (pipelines/lock.py): ``.tmp`` and ``.ckpt`` belong to its holder.
    A complete final dir stays in place (a forced rerun replaces it only once the new one is done).
    """
    import shutil

    final, tmp, ckpt = stage_dirs(run_root, stage, key)
    recover(run_root, stage, key)
    if tmp.exists():  # renamed first: tasks of a killed driver may still be writing into it
        dead = tmp.with_name(f"{tmp.name}.dead-{os.getpid()}-{time.time_ns()}")
        os.replace(tmp, dead)
    for dead in final.parent.glob(f"{final.name}.tmp.dead-*"):
        shutil.rmtree(dead, ignore_errors=True)
    if final.exists() and not is_complete(final, key):
        shutil.rmtree(final)
    tmp.mkdir(parents=True)
    return final, tmp, ckpt


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    return rc == 0  # EINVAL / ENOSYS (NFS, old kernels): the caller falls back to two renames


def promote(
    tmp: Path,
    final: Path,
    manifest: dict[str, Any],
    row_counts: dict[str, int],
    digests: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Finish ``tmp`` (hashes not taken while writing, fsync, manifest last) and put it in place
    of ``final``.

    A forced rerun's new output replaces the old atomically (exchanged in one syscall where the
    file system can, else renamed aside and back: ``recover`` completes that after a crash).
    Returns the manifest.
    """
    import shutil

    manifest = dict(manifest)
    manifest["files"] = list_files(tmp, row_counts, sync=True, digests=digests)
    manifest["finished_at"] = time.time()
    _write_manifest(tmp, manifest)
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now the previous output
    else:
        old = final.with_name(f"{final.name}.old-{os.getpid()}-{int(time.time())}")
        final.rename(old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    _fsync(final.parent, directory=True)
    return manifest


def verify(out_dir: Path, hashes: bool = False) -> list[str]:
    """Problems with a promoted dir: files listed in the manifest missing, of the wrong size or
    (with ``hashes``) of the wrong sha256. Each names the file, what was expected, what was found.
    """
    out_dir = Path(out_dir)
    m = read_manifest(out_dir)
    if m is None:
        return [f"{out_dir}: no manifest"]
    problems = []
    for entry in m.get("files", []):
        p = out_dir / entry["path"]
        if not p.is_file():
            problems.append(f"{p}: missing (manifest lists {entry['bytes']} bytes)")
            continue
        size = p.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{p}: expected {entry['bytes']} bytes, found {size}")
        elif hashes and entry.get("sha256") and (h := _sha256(p)) != entry["sha256"]:
            problems.append(f"{p}: expected sha256 {entry['sha256'][:16]}..., found {h[:16]}...")
    return problems


def move_aside_dir(out_dir: Path) -> Path:
    """Rename a damaged output out of the cache's way (kept for inspection, never served)."""
    out_dir = Path(out_dir)
    stem = f"{out_dir.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for i in itertools.count():
        # one process may move the same key aside twice within a second (a size check, then a
        # hash check): never rename onto an earlier copy
        dest = out_dir.with_name(stem if i == 0 else f"{stem}-{i}")
        try:
            os.rename(out_dir, dest)  # unlike os.replace, fails (ENOTEMPTY/EEXIST) onto a taken name
            return dest
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not dest.exists():
                raise


def verify_tree(
    run_root: Path, stages: list[str], move_aside: bool = False, lock_timeout_s: float = 90.0
) -> list[tuple[str, str, list[str], str]]:
    """``metamorph verify``: (stage, key, problems, note) for every promoted output of ``stages``,
    each file checked against its size and sha256. With ``move_aside`` a damaged output is renamed
    to ``{key}.damaged-*`` (under its key's lock; skipped while another run holds it)."""
    from pipelines.lock import StageLock, lock_path

    rows = []
    for stage in stages:
        base = Path(run_root) / stage
        if not base.is_dir():
            continue
        for d in sorted(base.iterdir()):
            if not (d.is_dir() and KEY_RE.match(d.name) and (d / MANIFEST).exists()):
                continue
            problems = verify(d, hashes=True)
            note = ""
            if problems and move_aside:
                lk = StageLock(lock_path(run_root, stage, d.name), timeout_s=lock_timeout_s)
                if lk.try_acquire():
                    try:
                        note = f"; moved to {move_aside_dir(d).name}, the next run recomputes it"
                    finally:
                        lk.release()
                else:
                    note = "; not moved: a run holds its lock"
            rows.append((stage, d.name, problems, note))
    return rows


# JSON keys that legitimately differ between two runs of one key: where the run root was
# (diffusers' save_pretrained records the dir it saved from) and wall-clock timings
_VOLATILE_KEYS = ("_name_or_path",)
_VOLATILE_SUFFIXES = ("seconds", "_at")


def _strip_volatile(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_volatile(v) for k, v in obj.items()
                if k not in _VOLATILE_KEYS and not str(k).endswith(_VOLATILE_SUFFIXES)}
    if isinstance(obj, list):
        return [_strip_volatile(v) for v in obj]
    return obj


# files that render a wall-clock time ("generated at", seconds per phase), compared by presence
TIMED_FILES = ("eval_report/report.html",)


def compare_outputs(a: Path, b: Path, timed: tuple[str, ...] = TIMED_FILES) -> list[str]:
    """Differences between two promoted outputs of one key (e.g. a run after faults and a clean
    run): files with another sha256, except JSON whose only differences are run-root paths and
    timings, and the ``timed`` files. Empty means the same result."""
    ma, mb = read_manifest(a), read_manifest(b)
    if ma is None or mb is None:
        return [f"{a if ma is None else b}: no manifest"]
    fa = {f["path"]: f["sha256"] for f in ma["files"]}
    fb = {f["path"]: f["sha256"] for f in mb["files"]}
    diffs = [f"{p}: only in {a if p in fa else b}" for p in sorted(set(fa) ^ set(fb))]
    for p in sorted(set(fa) & set(fb)):
        if fa[p] == fb[p] or p in timed:
            continue
        if p.endswith(".json"):
            try:
                ja, jb = (json.loads((d / p).read_text()) for d in (a, b))
                if _strip_volatile(ja) == _strip_volatile(jb):
                    continue
            except (OSError, ValueError):
                pass
        diffs.append(f"{p}: sha256 {fa[p][:12]} vs {fb[p][:12]}")
    return diffs


class DiskFull(OSError):
    """A stage ran out of space (or into a file size limit); names the path and the bytes needed."""


_FULL = ("No space left on device", "File too large", "Disk quota exceeded")


def _tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def explain_disk_full(exc: BaseException, tmp: Path) -> BaseException:
    """If ``exc`` (or its cause, or a Ray task error around it) is ENOSPC / EFBIG / EDQUOT: remove
    the attempt dir ``tmp`` and return a DiskFull naming the path and the bytes needed; else ``exc``."""
    import shutil

    import errno

    chain, e = [], exc
    while e is not None and len(chain) < 10:
        chain.append(e)
        e = e.__cause__ or e.__context__
    codes = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    hit = next((e for e in chain if isinstance(e, OSError) and e.errno in codes), None)
    if hit is None and not any(m in str(e) for e in chain for m in _FULL):
        return exc
    path = getattr(hit, "filename", None) or tmp
    written = _tree_bytes(tmp) if tmp.exists() else 0
    try:
        free = shutil.disk_usage(tmp.parent).free
    except OSError:
        free = -1
    previous = []
    for d in tmp.parent.iterdir() if tmp.parent.exists() else []:
        m = read_manifest(d) if d.is_dir() and not d.name.endswith(".tmp") else None
        if m:
            previous.append(sum(f.get("bytes", 0) for f in m.get("files", [])))
    estimate = (f"; a previous output of this stage took {max(previous)} bytes" if previous else "")
    shutil.rmtree(tmp, ignore_errors=True)
    cause = hit.strerror if hit is not None and hit.strerror else "out of space"
    return DiskFull(
        f"{cause} writing {path}: the attempt had written {written} bytes into {tmp} with "
        f"{free} bytes left free there, so it needs more than {written + max(free, 0)} bytes{estimate}. "
        f"The attempt dir was removed; free space (or raise the file size limit) and rerun."
    )


KEY_RE = re.compile(rf"^[0-9a-f]{{{KEY_LEN}}}$")
STAGE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def check_key(value: Any, what: str = "cache key") -> str:
    """A cache key read from outside (MLflow tags, a manifest) before it becomes a path part."""
    if not isinstance(value, str) or not KEY_RE.match(value):
        raise ValueError(f"{what} {value!r} is not a cache key ({KEY_LEN} lowercase hex chars)")
    return value


def check_stage_name(value: Any) -> str:
    if not isinstance(value, str) or not STAGE_RE.match(value):
        raise ValueError(f"stage name {value!r} is not an identifier")
    return value


def check_run_root(value: Any, what: str = "run_root") -> Path:
    """A run root read from outside (an MLflow tag): an absolute, normalized local path."""
    if not isinstance(value, str) or not value or "\0" in value or "\n" in value:
        raise ValueError(f"{what} {value!r} is not a path")
    p = Path(value)
    if not p.is_absolute() or ".." in p.parts or os.path.normpath(value) != value.rstrip("/") or value.startswith("//"):
        raise ValueError(f"{what} {value!r} must be an absolute, normalized path")
    return p


_GIT_SHA: str | None = None


def git_sha() -> str:
    import subprocess

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
        from pipelines.config import to_plain

        return to_plain(obj)
    return obj
