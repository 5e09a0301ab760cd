"""The whole tiny DAG from an empty run root: wall time, each stage's time, and the critical path.

    python bench/dag.py                         # tiny preset, once, in a fresh temporary run root
    python bench/dag.py --repeat 3              # best of 3 (the README's "5 minutes" figure)
    python bench/dag.py --preset smoke          # the plumbing, in about a minute
    python bench/dag.py --report RUN_ROOT       # only read the manifests of a finished run

Runs ``metamorph run --preset P --run-root EMPTY`` as a subprocess (what a new user types), then
reads every stage's ``_SUCCESS.json`` (start, finish, seconds, upstream keys). The critical path is
the chain of stages, following the manifests' upstream edges, whose durations add up to the most:
no scheduler can finish the DAG faster than its sum, so it says which stage to make cheaper.
"wait" is the time a stage started after its last upstream stage finished (scheduling slack).

Prints, as ratios measured in the same run: wall / critical path (1.0 = the scheduler loses
nothing; the rest is Ray start-up, the driver and waiting for CPUs), wall / sum of stage times
(< 1 when stages overlap) and wall / the budget: "5 minutes" on this kind of machine, which is 90x
the machine-speed figure of a calibration run (``--calibration SECONDS``; machines of one kind
differ up to 2x), else 300 s. The load average is printed beside every wall time: on a shared
machine a timing means little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUDGET_S = 300.0  # without --calibration
BUDGET_PER_CALIBRATION = 90.0  # "5 minutes" = 90 x the calibration figure


def read_manifests(run_root: Path) -> dict[str, dict]:
    """stage -> its newest manifest (the one this run wrote, in a fresh root the only one)."""
    out: dict[str, dict] = {}
    for m in run_root.glob("*/*/_SUCCESS.json"):
        d = json.loads(m.read_text())
        if d.get("stage") and (d["stage"] not in out or d["finished_at"] > out[d["stage"]]["finished_at"]):
            out[d["stage"]] = d
    return out


def critical_path(man: dict[str, dict]) -> tuple[float, list[str], dict[str, list[str]]]:
    """(length, stages on it in order, upstream stages of each) from the manifests' upstream keys."""
    by_key = {d["key"]: s for s, d in man.items()}
    ups = {s: sorted({by_key[k] for k in d.get("upstream", {}).values() if k in by_key}) for s, d in man.items()}
    best: dict[str, tuple[float, list[str]]] = {}

    def longest(s: str) -> tuple[float, list[str]]:
        if s not in best:
            prev = max((longest(u) for u in ups[s]), default=(0.0, []), key=lambda t: t[0])
            best[s] = (prev[0] + float(man[s]["seconds"]), prev[1] + [s])
        return best[s]

    length, path = max((longest(s) for s in man), key=lambda t: t[0])
    return length, path, ups


def report(run_root: Path, wall: float | None, load: tuple[float, float, float], budget: float = BUDGET_S) -> float:
    man = read_manifests(run_root)
    if not man:
        raise SystemExit(f"no stage manifests under {run_root}")
    t0 = min(d["started_at"] for d in man.values())
    length, path, ups = critical_path(man)
    print(f"{'stage':24s} {'start':>7s} {'end':>7s} {'seconds':>8s} {'wait':>6s}  critical")
    for s, d in sorted(man.items(), key=lambda kv: kv[1]["started_at"]):
        ready = max((man[u]["finished_at"] for u in ups[s]), default=t0)
        print(f"{s:24s} {d['started_at'] - t0:7.1f} {d['finished_at'] - t0:7.1f} {d['seconds']:8.1f} "
              f"{max(0.0, d['started_at'] - ready):6.1f}  {'*' if s in path else ''}")
    total = sum(float(d["seconds"]) for d in man.values())
    span = max(d["finished_at"] for d in man.values()) - t0
    wall = span if wall is None else wall
    print(f"critical path: {' -> '.join(path)} = {length:.1f} s")
    print(f"wall {wall:.1f} s (first stage start to last finish {span:.1f} s); load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"ratios: wall / critical path {wall / length:.2f}; wall / sum of stages {wall / total:.2f} "
          f"(sum {total:.1f} s); wall / {budget:.0f} s budget {wall / budget:.2f}")
    return wall


def run_once(preset: str, keep: Path | None, extra: list[str]) -> tuple[float, Path]:
    root = keep or Path(tempfile.mkdtemp(prefix="metamorph-dag-"))
    if any(root.iterdir()) if root.exists() else False:
        raise SystemExit(f"{root} is not empty: the bench measures a run from an empty run root")
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--preset", preset, "--run-root", str(root), "--quiet", *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.stdout.write(proc.stdout[-4000:])
        raise SystemExit(f"metamorph run failed (exit {proc.returncode}); run root {root}")
    return wall, root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--repeat", type=int, default=1, help="runs from an empty root; the best wall time counts")
    ap.add_argument("--run-root", type=Path, default=None, help="use this (empty) root for a single run and keep it")
    ap.add_argument("--report", type=Path, default=None, help="only print the table of a finished run root")
    ap.add_argument("--calibration", type=float, default=None,
                    help="this machine's calibration figure in seconds: the budget is 90x it (default: 300 s)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides passed to metamorph run")
    args = ap.parse_args()
    budget = BUDGET_S if args.calibration is None else BUDGET_PER_CALIBRATION * args.calibration
    if args.report:
        report(args.report, None, os.getloadavg(), budget)
        return
    walls = []
    for i in range(args.repeat):
        load_before = os.getloadavg()
        wall, root = run_once(args.preset, args.run_root if args.repeat == 1 else None, args.overrides)
        print(f"\n== run {i + 1}/{args.repeat} ({args.preset}, {root}); load average at start {load_before[0]:.2f}")
        walls.append(report(root, wall, os.getloadavg(), budget))
        if args.run_root is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nbest of {len(walls)}: {min(walls):.1f} s = {min(walls) / budget:.2f} x the {budget:.0f} s budget")


if __name__ == "__main__":
    main()
