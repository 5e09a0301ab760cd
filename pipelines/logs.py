"""Where output goes during `metamorph run`: log files per stage, progress files, worker capture.

    metamorph run --preset smoke -v     # the same lines, also shown live on the console

Layout, one directory per invocation (``run_id`` = the MLflow parent run id, or a timestamp):

    {run_root}/logs/<run id>/<stage>.log            the stage's driver thread (Python logging) and
                                                     its Ray workers' stdout/stderr
    {run_root}/logs/<run id>/driver.log             the rest: Ray's own driver output, records no
                                                     stage can be told apart for
    {run_root}/logs/<run id>/<stage>.progress.json  the stage's latest progress (the console polls it)

The console belongs to the live view (``pipelines.console``). Progress travels through a small
JSON file rewritten atomically: it works from the driver thread and from any Ray worker on a host
that sees the run root (a cluster's run root is shared storage anyway), and a reader never sees
half a file. Nothing here imports ray, torch or mlflow.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

STAGE_THREAD_PREFIX = "stage-"  # runner threads are named stage-<name>
DRIVER_LOG = "driver.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_path(log_dir: Path, stage: str) -> Path:
    return Path(log_dir) / f"{stage}.log"


def progress_path(log_dir: Path, stage: str) -> Path:
    return Path(log_dir) / f"{stage}.progress.json"


# ------------------------------------------------------------------ progress channel
def write_progress(path: str | Path | None, **fields: Any) -> None:
    """Replace the progress file with ``fields`` (+ a timestamp). ``path`` None: a no-op.

    Conventional fields: ``done`` and ``total`` (numbers), ``unit`` ("steps", "records"),
    ``metric`` (a short "loss=0.41" string shown in the table). Never raises: progress is a
    convenience and must not fail a stage.
    """
    if not path:
        return
    path = Path(path)
    try:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({**fields, "time": time.time()}))
        os.replace(tmp, path)
    except OSError:
        pass


def read_progress(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ driver side
class StageRouter(logging.Handler):
    """A root-logger handler that files each record under the stage that emitted it.

    A record from a runner thread (``stage-<name>``) goes to that stage's log. Ray Data and Ray
    Train log from their own threads; while exactly one stage runs those records are its own,
    otherwise they go to driver.log.
    """

    def __init__(self, log_dir: Path):
        super().__init__(logging.INFO)  # Ray Data logs DEBUG chatter to its own file already
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.setFormatter(logging.Formatter(FORMAT))
        self.running: set[str] = set()
        self._files: dict[str, Any] = {}
        self._guard = threading.Lock()

    def stage_started(self, stage: str) -> None:
        with self._guard:
            self.running.add(stage)

    def stage_ended(self, stage: str) -> None:
        with self._guard:
            self.running.discard(stage)

    def target(self, record: logging.LogRecord) -> str:
        name = record.threadName or ""
        if name.startswith(STAGE_THREAD_PREFIX):
            return name[len(STAGE_THREAD_PREFIX):]
        running = self.running
        if len(running) == 1:
            return next(iter(running))
        return DRIVER_LOG.removesuffix(".log")

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            with self._guard:
                stage = self.target(record)
                f = self._files.get(stage)
                if f is None:
                    f = self._files[stage] = open(log_path(self.log_dir, stage), "a", encoding="utf-8")
                f.write(msg + "\n")
                f.flush()
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)

    def close(self) -> None:
        with self._guard:
            for f in self._files.values():
                f.close()
            self._files.clear()
        super().close()


# Loggers of libraries that install their own console handlers (Ray's "ray", Ray Data's
# "ray.data", Ray Train's "ray.train"): their records are sent up to the root's file handlers
# instead, so nothing they log lands on the console.
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "mlflow", "alembic",
                   "transformers", "diffusers", "urllib3", "filelock", "torch", "py.warnings")


def quiet_library_loggers() -> None:
    """Route library loggers through the root logger (our files). Call again after a library
    configures itself on import (``import ray.data`` does)."""
    for name in LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        for h in list(lg.handlers):
            lg.removeHandler(h)
            # Ray Data's own ray-data.log FileHandler would otherwise stay open (a ResourceWarning at
            # exit); an append-mode FileHandler reopens on its next emit if anything still uses it
            h.close()
        lg.propagate = True


class RunLogs:
    """The driver's log setup for one invocation: root logger -> per-stage files.

    ``console_level``: records at or above it also reach ``console_handler`` (the live view
    shows them above its table); None keeps the console to the live view alone.
    """

    def __init__(self, log_dir: Path, level: int = logging.INFO):
        self.log_dir = Path(log_dir)
        self.router = StageRouter(self.log_dir)
        self.level = level
        self._saved: list[Any] = []

    def __enter__(self) -> "RunLogs":
        root = logging.getLogger()
        self._saved = [root.level, list(root.handlers)]
        for h in list(root.handlers):
            # keep pytest's capture handlers (tests read them); drop console stream handlers
            if type(h) is logging.StreamHandler:
                root.removeHandler(h)
        root.addHandler(self.router)
        root.setLevel(min(self.level, root.level) if root.level else self.level)
        logging.captureWarnings(True)
        quiet_library_loggers()
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger()
        root.removeHandler(self.router)
        self.router.close()
        level, handlers = self._saved
        root.setLevel(level)
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        logging.captureWarnings(False)


@contextlib.contextmanager
def redirect_fds(path: Path) -> Iterator[int]:
    """Point this process's fd 1 and 2 at ``path`` (append); yield a dup of the old fd 2.

    For the CLI only: whatever writes to stdout/stderr (a library's own handler, a C extension,
    a progress bar) lands in the file; the live view writes to the yielded terminal fd.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield saved_err
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        os.close(saved_out)
        os.close(saved_err)


# ------------------------------------------------------------------ worker side
@contextlib.contextmanager
def capture_output(path: str | Path | None, level: int = logging.INFO) -> Iterator[None]:
    """Inside a Ray worker: stdout, stderr and Python logging go to the stage's log file.

    ``path`` None or "": no change (a stage run outside the engine, e.g. by a unit test).
    Every rank appends to the same file (O_APPEND keeps lines whole).
    """
    if not path:
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [pid {os.getpid()}] %(name)s: %(message)s"))
    old_level = root.level
    with redirect_fds(Path(path)):
        root.addHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(True)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(old_level)
