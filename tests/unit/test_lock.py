"""Stage-key locks: one holder at a time across processes, dead holders taken over, heartbeats.

    python -m pytest tests/unit/test_lock.py -q
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.lock import HOST, StageLock, read_holder


def _worker(path: str, log: str, n: int, hold_s: float) -> None:
    for _ in range(n):
        lk = StageLock(Path(path), timeout_s=30, heartbeat_s=0.2, poll_s=0.01)
        lk.acquire()
        with open(log, "a") as f:  # O_APPEND: one line per write, in order
            f.write(f"in {os.getpid()}\n")
        time.sleep(hold_s)
        with open(log, "a") as f:
            f.write(f"out {os.getpid()}\n")
        lk.release()


def test_processes_never_hold_one_key_at_once(tmp_path):
    path, log = tmp_path / "k.lock", tmp_path / "log"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(str(path), str(log), 5, 0.02)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    lines = log.read_text().split("\n")[:-1]
    assert len(lines) == 30
    for a, b in zip(lines[::2], lines[1::2]):  # strictly in/out pairs of one pid: no overlap
        assert a.startswith("in ") and b == "out " + a[3:], lines
    assert not path.exists()  # the last holder released


def test_content_and_heartbeat(tmp_path):
    lk = StageLock(tmp_path / "k.lock", timeout_s=3, heartbeat_s=0.1)
    lk.acquire()
    try:
        info = read_holder(lk.path)
        assert info["host"] == HOST and info["pid"] == os.getpid() and info["token"] == lk.token
        os.utime(lk.path, (time.time() - 100, time.time() - 100))
        time.sleep(0.5)
        assert read_holder(lk.path)["age_s"] < 1.0  # the heartbeat refreshed the mtime
        other = StageLock(tmp_path / "k.lock", timeout_s=3, heartbeat_s=0.1)
        assert not other.try_acquire()  # live holder, fresh heartbeat
    finally:
        lk.release()
    assert not lk.path.exists()


def test_killed_holder_on_this_host_is_taken_over_at_once(tmp_path):
    path = tmp_path / "k.lock"
    code = ("import sys, time; from pathlib import Path; from pipelines.lock import StageLock; "
            "StageLock(Path(sys.argv[1]), timeout_s=600, heartbeat_s=1).acquire(); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert p.stdout.readline().strip() == "held"
    waiter = StageLock(path, timeout_s=600, heartbeat_s=1)
    assert not waiter.try_acquire()  # alive: wait
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    t0 = time.time()
    waiter.acquire(deadline_s=10)  # dead pid on this host: no need to wait out the 600 s timeout
    assert time.time() - t0 < 5
    assert read_holder(path)["token"] == waiter.token
    waiter.release()


def test_stale_heartbeat_from_another_host_is_taken_over_and_the_old_holder_notices(tmp_path):
    path = tmp_path / "k.lock"
    old = StageLock(path, timeout_s=1.0, heartbeat_s=0.3)
    old.acquire()
    old._stop.set()  # the old holder stalls (no more heartbeats) ...
    old._beat.join()
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "host": "elsewhere"}))  # ... on a host we cannot probe
    new = StageLock(path, timeout_s=1.0, heartbeat_s=0.3)
    assert not new.try_acquire()  # heartbeat still fresh
    os.utime(path, (time.time() - 5, time.time() - 5))
    assert new.try_acquire()
    assert read_holder(path)["token"] == new.token
    old._stop.clear()  # the old holder wakes up: its heartbeat sees another token
    import threading

    t = threading.Thread(target=old._heartbeat)
    t.start()
    time.sleep(0.6)
    old._stop.set()
    t.join()
    with pytest.raises(Exception, match="taken over"):
        old.check()
    old.release()  # must not remove the new holder's lock
    assert read_holder(path)["token"] == new.token
    new.release()


def test_a_takeover_never_removes_a_fresh_lock(tmp_path):
    """Two waiters judge one stale lock: the first replaces it; the second's takeover must see
    the new token and leave the new lock alone."""
    path = tmp_path / "k.lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "dead"}))
    os.utime(path, (time.time() - 100, time.time() - 100))
    a, b = StageLock(path, timeout_s=1), StageLock(path, timeout_s=1)
    judged_by_b = read_holder(path)
    assert a.try_acquire()
    assert not b._take_over(judged_by_b)
    assert read_holder(path)["token"] == a.token
    assert not (tmp_path / "k.lock.takeover").exists()
    a.release()
