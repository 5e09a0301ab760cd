"""One lock file per stage key, so runs that share a run root never compute a key twice.

    python -c "from pipelines.lock import read_holder; print(read_holder('runs/mix/KEY.lock'))"

``{run_root}/{stage}/{key}.lock`` holds JSON (host, pid, the pid's start time, a token, when it was
taken). The holder's heartbeat thread touches the file every ``heartbeat_s``; a lock whose mtime
is older than ``timeout_s`` belongs to a dead holder (a node that died, a driver that was
SIGKILLed on another host) and is taken over. On the holder's own host a dead pid is noticed at
once (no need to wait out the timeout after a local crash or kill).

Only primitives that work on a shared file system (NFS, Lustre, CephFS) are used: create with
``O_CREAT | O_EXCL`` (atomic on NFSv3+), read, ``utime``, ``unlink``. Taking over a stale lock is
the racy part (two waiters may judge it stale at once, and a fresh lock may appear between
"judged stale" and "removed"), so it happens under a second, short-lived ``{key}.lock.takeover``
file created the same way: its holder re-reads the lock, removes it only if it is still the very
lock (same token) judged stale, and releases. Whoever then wins the ``O_EXCL`` create holds the key.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

HOST = socket.gethostname()
TAKEOVER_STALE_S = 30.0  # a takeover file is held for milliseconds; older means its holder died


class LockLost(RuntimeError):
    """Our lock was taken over (we stalled longer than the timeout): stop writing shared state."""


def _proc_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _proc_start(pid)
    if now is None:  # no /proc (not Linux): trust kill(0)
        return True
    try:  # a zombie (killed, not yet reaped by its parent) holds nothing
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        pass
    return start is None or now == start


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The lock's content plus ``age_s`` (seconds since the last heartbeat); None if unlocked."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
        if not isinstance(info, dict):
            info = {}
    except ValueError:  # being written this instant (create, then write): judged by mtime alone
        info = {}
    info["age_s"] = max(0.0, time.time() - st.st_mtime)
    info["mtime_ns"] = st.st_mtime_ns
    return info


def describe(info: dict[str, Any]) -> str:
    since = info.get("started_at")
    ago = f", started {time.time() - since:.0f}s ago" if isinstance(since, (int, float)) else ""
    return f"{info.get('host', '?')} pid {info.get('pid', '?')}{ago}, heartbeat {info['age_s']:.0f}s ago"


def is_stale(info: dict[str, Any], timeout_s: float) -> bool:
    if info["age_s"] > timeout_s:
        return True
    pid = info.get("pid")
    if info.get("host") == HOST and isinstance(pid, int):
        return not _pid_alive(pid, info.get("pid_start"))
    return False


@dataclass
class StageLock:
    """``with StageLock(path).hold(on_wait=...):`` waits for the key, holds it, releases it."""

    path: Path
    timeout_s: float = 60.0  # no heartbeat for this long: the holder is dead (3+ missed beats)
    heartbeat_s: float = 5.0
    poll_s: float = 0.5

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost = False

    # ------------------------------------------------------------------ acquire / release
    def _content(self) -> bytes:
        pid = os.getpid()
        return json.dumps({"host": HOST, "pid": pid, "pid_start": _proc_start(pid), "token": self.token,
                           "started_at": time.time()}).encode()

    def try_acquire(self) -> bool:
        """One attempt: create the lock file, or take over a stale one. Never blocks."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._create():
            return True
        info = read_holder(self.path)
        if info is None:  # released between our create and our read: try again at once
            return self._create()
        if info.get("token") == self.token:
            return True
        if is_stale(info, self.timeout_s) and self._take_over(info):
            return self._create()
        return False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, self._content())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over(self, judged: dict[str, Any]) -> bool:
        """Remove the stale lock ``judged`` if it is still that lock; True if it is gone."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        except FileExistsError:
            try:  # a taker that died holding the guard (it is held for milliseconds)
                if time.time() - guard.stat().st_mtime > TAKEOVER_STALE_S:
                    guard.unlink()
            except FileNotFoundError:
                pass
            return False
        try:
            now = read_holder(self.path)
            if now is None:
                return True
            same = (now.get("token"), now["mtime_ns"]) == (judged.get("token"), judged["mtime_ns"])
            if not same or not is_stale(now, self.timeout_s):
                return False  # a new holder, or the old one came back to life
            log.warning("taking over the lock %s from a dead holder (%s)", self.path, describe(now))
            self.path.unlink()
            return True
        finally:
            try:
                guard.unlink()
            except FileNotFoundError:
                pass

    def acquire(self, on_wait: Callable[[dict[str, Any]], None] | None = None, deadline_s: float | None = None) -> None:
        """Block until we hold the lock; ``on_wait(holder)`` once, when we first have to wait."""
        t0 = time.time()
        told = False
        while not self.try_acquire():
            if not told:
                info = read_holder(self.path) or {"age_s": 0.0}
                log.info("waiting for %s: held by %s", self.path, describe(info))
                if on_wait is not None:
                    on_wait(info)
                told = True
            if deadline_s is not None and time.time() - t0 > deadline_s:
                raise TimeoutError(f"waited {deadline_s:.0f}s for the lock {self.path}")
            time.sleep(self.poll_s)
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lock-{self.path.name}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            info = read_holder(self.path)
            if info is None or (info.get("token") not in (None, self.token)):
                self.lost = True
                log.error("lost the lock %s (now %s): another run took it over", self.path,
                          describe(info) if info else "removed")
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return

    def check(self) -> None:
        if self.lost:
            raise LockLost(f"the lock {self.path} was taken over while we held it (stalled > {self.timeout_s:.0f}s?)")

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
            self._beat = None
        info = read_holder(self.path)
        if info is not None and info.get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "StageLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_path(run_root: Path, stage: str, key: str) -> Path:
    return Path(run_root) / stage / f"{key}.lock"
