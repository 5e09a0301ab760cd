"""The console of `metamorph run`: one live table of stages, or plain lines off a terminal.

    metamorph run --preset smoke          # a table updating in place (on a terminal)
    metamorph run --preset smoke | cat    # one line per event, progress at most every 10 s
    metamorph run --preset smoke -v       # also every log line, as it is written
    metamorph run --preset smoke -q       # errors and the summary only

``LiveView`` is an ``Engine.run`` listener (``pipelines.runner.StageEvent``). Progress comes
from the stages' progress files (``pipelines.logs.write_progress``), polled twice a second; the
log files are tailed for ``-v``. Everything else (Ray, workers, libraries) is in the log files.

Text is written in styled segments (``Out``): rich draws them on a terminal; off one they are
plain text and tables are aligned columns, without importing rich (a fully cached run off a
terminal loads nothing it does not print with).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TextIO, Union

from pipelines.logs import read_progress

QUIET, NORMAL, VERBOSE = 0, 1, 2
STYLE = {"waiting": "dim", "damaged": "red", "running": "bold yellow", "cached": "green", "done": "bold green",
         "failed": "bold red", "blocked": "red"}
PLAIN_PROGRESS_EVERY_S = 10.0  # off a terminal: at most one progress line per stage this often

Cell = Union[str, "tuple[str, str]"]  # text, or (text, rich style)


class Out:
    """Where the view writes: styled segments and tables; rich on a terminal, plain text off one.
    Text is never parsed as markup, so whatever a stage or an error says is printed as is."""

    def __init__(self, file: TextIO | None = None, rich: bool | None = None):
        self.file = file if file is not None else sys.stderr
        self.rich = _isatty(self.file) if rich is None else rich
        self.console = None
        if self.rich:
            from rich.console import Console

            self.console = Console(file=self.file, highlight=False, soft_wrap=True)

    def line(self, *cells: Cell) -> None:
        if self.console is not None:
            from rich.text import Text

            self.console.print(Text.assemble(*cells))
        else:
            self.file.write("".join(_text(c) for c in cells) + "\n")
            self.file.flush()

    def raw(self, text: str) -> None:
        """A line as is (log tails)."""
        if self.console is not None:
            self.console.out(text, highlight=False)
        else:
            self.file.write(text + "\n")

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Cell]]) -> None:
        if self.console is not None:
            self.console.print(rich_table(title, columns, rows))
            return
        text = [[_text(c) for c in row] for row in rows]
        widths = [max([len(col)] + [len(r[i]) for r in text]) for i, col in enumerate(columns)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [title, "  " + fmt.format(*columns).rstrip()] + ["  " + fmt.format(*r).rstrip() for r in text]
        self.file.write("\n".join(out) + "\n")
        self.file.flush()


def rich_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Cell]], no_wrap: bool = False, **kw: Any):
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, title_justify="left", **kw)
    for col in columns:
        t.add_column(col, no_wrap=no_wrap)
    for row in rows:
        t.add_row(*(Text(c) if isinstance(c, str) else Text(c[0], style=c[1]) for c in row))
    return t


def _text(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell[0]


def _isatty(f: Any) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False


def print_plan(items: Sequence[Any], file: TextIO | None = None, as_json: bool = False) -> None:
    """The plan (``planning.PlanItem``s) as a table on stderr (default), or as JSON on stdout."""
    if as_json:
        import json

        print(json.dumps([{"stage": i.name, "key": i.key, "action": i.action, "reason": i.reason,
                           "out_dir": str(i.out_dir)} for i in items], indent=2))
        return
    style = {"run": "bold yellow", "cached": "green", "skip": "dim"}
    rows = [(str(i), it.name, it.key, (it.action, style[it.action]), it.reason) for i, it in enumerate(items, 1)]
    Out(file).table("plan", ("#", "stage", "key", "action", "why"), rows)


@dataclass
class StageRow:
    name: str
    state: str = "waiting"
    started: float | None = None
    ended: float | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    detail: str = ""
    log_path: Path | None = None
    progress_path: Path | None = None
    last_plain: float = 0.0

    def elapsed(self, now: float) -> float | None:
        if self.started is None:
            return None
        return (self.ended or now) - self.started

    def progress_text(self) -> str:
        p = self.progress
        if not p or p.get("done") is None:
            return ""
        done, total, unit = p["done"], p.get("total"), p.get("unit", "")
        if total:
            return f"{_num(done)}/{_num(total)} {unit}".strip() + f" ({100 * done / total:.0f}%)"
        return f"{_num(done)} {unit}".strip()

    def eta(self, now: float) -> float | None:
        p = self.progress
        el = self.elapsed(now)
        if self.state != "running" or not p or not p.get("total") or not p.get("done") or not el:
            return None
        # time since the stage started includes setup (Ray workers, data): an upper bound
        return el * (p["total"] - p["done"]) / p["done"]


def _num(x: Any) -> str:
    return f"{x:.0f}" if isinstance(x, (int, float)) and float(x).is_integer() else f"{x}"


def _dur(s: float | None) -> str:
    if s is None:
        return ""
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


# The figures a reader of the summary looks for first: the evaluation's headline scores, then
# what a curation stage kept and set aside.
HEADLINE_FIRST = ("eval/qa_acc", "eval/retrieval_top1", "eval/gen_attr_acc")
HEADLINE_COUNTS = ("samples_out", "heldout_out", "quarantined")
# the attribute judge's own test: its weakest attribute and whether its verdicts count
HEADLINE_JUDGE = ("judge_acc_min", "judge_ok")


def headline(stats: dict[str, Any], n: int = 3) -> str:
    """The few numbers worth a glance: the headline scores, other eval/*, then final values and
    losses, then counts (n_*, samples out, quarantined)."""
    nums = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    order = [k for k in HEADLINE_FIRST if k in nums]
    order += [k for k in nums if k.startswith("eval/") and k not in order]
    order += [k for k in HEADLINE_JUDGE if k in nums and k not in order]
    order += [k for k in nums if k.startswith("final") and k not in order]
    order += [k for k in nums if "loss" in k and not k.startswith("first") and k not in order]
    order += [k for k in nums if k.startswith("n_") and k not in order]
    order += [k for k in HEADLINE_COUNTS if k in nums and k not in order]
    return "  ".join(f"{k}={nums[k]:.4g}" for k in order[:n])


class LiveView:
    """Listener for ``Engine.run``: draws the stage table (TTY) or prints event lines."""

    def __init__(self, stages: list[str], file: TextIO | None = None, verbosity: int = NORMAL,
                 live: bool | None = None, poll_s: float = 0.5):
        self.out = Out(file, rich=live)
        self.verbosity = verbosity
        self.live_mode = self.out.rich and verbosity >= NORMAL
        self.rows = {n: StageRow(n) for n in stages}
        self.t0 = time.time()
        self.poll_s = poll_s
        self._live: Any = None  # rich.live.Live while the table is drawn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.RLock()
        self._tails: dict[Path, int] = {}
        self.log_dir: Path | None = None
        self.on_stage_state = None  # optional hook(stage, running: bool) (the log router)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "LiveView":
        if self.live_mode:
            from rich.live import Live

            # redirect_*=False: what a library writes to sys.stdout/stderr must not reach the table
            self._live = Live(self.table(), console=self.out.console, refresh_per_second=4, transient=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        self._thread = threading.Thread(target=self._poll, name="console-poll", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._refresh()
        if self._live is not None:
            self._live.stop()
            self._live = None

    def __enter__(self) -> "LiveView":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ output
    def print(self, *cells: Cell) -> None:
        """A line above the table (or a plain line): text, or (text, style) segments."""
        with self._lock:
            self.out.line(*cells)

    def error(self, msg: str) -> None:
        self.print(("error:", "bold red"), f" {msg}")

    def table(self):
        """The live table (a rich Table: drawn on a terminal only)."""
        now = time.time()
        rows = []
        for r in self.rows.values():
            metric = r.progress.get("metric", "") if r.state == "running" else headline(r.stats, 1)
            rows.append((r.name, (r.state, STYLE.get(r.state, "default")), _dur(r.elapsed(now)), r.progress_text(),
                         _dur(r.eta(now)), metric or ""))
        return rich_table(f"metamorph run  {_dur(now - self.t0)}", ("stage", "state", "elapsed", "progress", "eta", "metric"),
                          rows, no_wrap=True, expand=False)

    def _refresh(self) -> None:
        with self._lock:
            for r in self.rows.values():
                if r.progress_path is not None and r.state == "running":
                    p = read_progress(r.progress_path)
                    if p:
                        r.progress = p
            if self._live is not None:
                self._live.update(self.table())
            elif self.verbosity >= NORMAL:
                now = time.time()
                for r in self.rows.values():
                    if r.state == "running" and r.progress and now - r.last_plain >= PLAIN_PROGRESS_EVERY_S:
                        r.last_plain = now
                        eta = _dur(r.eta(now))
                        self._line(r.name, "progress", f"{r.progress_text()} {r.progress.get('metric', '')}"
                                   + (f" eta {eta}" if eta else ""))
            if self.verbosity >= VERBOSE:
                self._tail()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._refresh()
            except Exception:  # noqa: BLE001 - the view must never take the run down
                pass

    def _tail(self) -> None:
        if self.log_dir is None or not self.log_dir.exists():
            return
        for path in sorted(self.log_dir.glob("*.log")):
            pos = self._tails.get(path, 0)
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except OSError:
                continue
            cut = data.rfind(b"\n") + 1  # whole lines only
            if not cut:
                continue
            self._tails[path] = pos + cut
            for line in data[:cut].decode("utf-8", "replace").splitlines():
                self.out.raw(f"{path.stem}| {line}")

    def _line(self, stage: str, kind: str, detail: str) -> None:
        colour = STYLE.get({"start": "running", "started": "dim"}.get(kind, kind), "default")
        self.out.line((f"{time.time() - self.t0:7.1f}s", "dim"), " ", (f"{kind:>8}", colour), f" {stage}  ", (detail, "dim"))

    # ------------------------------------------------------------------ events
    def __call__(self, ev) -> None:
        with self._lock:
            if not ev.stage:  # run-level events
                if ev.kind == "ray" and self.verbosity >= NORMAL and not self.live_mode:
                    self._line("ray", "started", ev.detail)
                return
            r = self.rows.setdefault(ev.stage, StageRow(ev.stage))
            r.log_path, r.progress_path = ev.log_path, ev.progress_path
            now = time.time()
            was_running = r.state == "running"
            if ev.kind == "waiting" and not was_running:  # not started yet: upstream stages run
                r.state = "waiting"
                return
            if ev.kind in ("waiting", "damaged"):  # a started stage: another run holds its key's
                # lock, or its cached output failed verification and is recomputed; say so
                r.detail = ev.detail
                if self._live is None and self.verbosity >= NORMAL:
                    self._line(ev.stage, ev.kind, ev.detail)
                elif ev.kind == "damaged":
                    self.print((f"{ev.stage}: cached output damaged", "red"), f": {ev.detail}")
                if self._live is not None:
                    self._live.update(self.table())
                return
            if ev.kind == "start":
                r.state, r.started = "running", now
            elif ev.kind in ("done", "cached", "failed", "blocked"):
                r.state = ev.kind
                if r.started is None:
                    r.started = now
                r.ended = now
                r.stats = ev.stats or {}
                if ev.kind == "done" and r.progress.get("total"):
                    r.progress = {**r.progress, "done": r.progress["total"]}
            r.detail = ev.detail
            if self.on_stage_state is not None and (ev.kind != "cached" or was_running):
                self.on_stage_state(ev.stage, ev.kind == "start")
            if ev.kind == "failed":
                where = f"\n  log: {ev.log_path}" if ev.log_path else ""
                self.print((f"stage {ev.stage} failed", "bold red"), f": {ev.detail}{where}")
            elif self._live is None and self.verbosity >= NORMAL:
                detail = _dur(ev.seconds) if ev.kind == "done" else ev.detail
                if ev.kind == "done" and ev.stats:
                    detail += "  " + headline(ev.stats)
                self._line(ev.stage, ev.kind, detail)
            if self._live is not None:
                self._live.update(self.table())

    # ------------------------------------------------------------------ the end
    def summary(self, run_id: str | None, run_root: Path, log_dir: Path | None, ok: bool,
                produced_by: dict[str, str] | None = None) -> None:
        """The closing table and where the record is. ``run_id`` None: nothing ran, so no MLflow
        run was opened; ``produced_by`` (stage -> MLflow run id, from the manifests) then names
        the runs that computed the cached outputs."""
        now = time.time()
        rows = []
        for r in self.rows.values():
            status = {"done": "ran"}.get(r.state, r.state)
            rows.append((r.name, (status, STYLE.get(r.state, "default")), _dur(r.elapsed(now)), headline(r.stats)))
        word = ("done", "bold green") if ok else ("failed", "bold red")
        with self._lock:
            self.out.table("summary", ("stage", "status", "time", "headline"), rows)
            if run_id is None and ok:
                by_run: dict[str, list[str]] = {}
                for stage, rid in (produced_by or {}).items():
                    by_run.setdefault(rid, []).append(stage)
                runs = [f"{rid} ({len(st)} stage{'s' if len(st) > 1 else ''})" for rid, st in by_run.items()]
                more = f" and {len(runs) - 3} more" if len(runs) > 3 else ""  # older manifests name only the stage's run
                self.out.line(word, f" in {_dur(now - self.t0)}: nothing to run, every stage cached (no new MLflow run); logs {log_dir}")
                self.out.line(f"outputs computed by mlflow run {'; '.join(runs[:3]) or 'none recorded'}{more}")
            else:
                self.out.line(word, f" in {_dur(now - self.t0)}; mlflow run {run_id}; logs {log_dir}")
            self.out.line(f"open it: metamorph ui --run-root {run_root}")
