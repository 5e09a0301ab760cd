"""Chaos: SIGKILL the driver of a smoke run at random moments, N times, then let it finish; the
final outputs must equal a clean run's, file for file (sha256 from the manifests).

    python bench/chaos.py                       # 3 kills, smoke preset, whole DAG, 30 min budget
    python bench/chaos.py --kills 5 --until mix --budget 900 --seed 7

Each kill takes the driver's whole process group (its local Ray included), as a crashed login
node or an OOM kill would. The clean run is measured first, in this invocation; kill times are
drawn uniformly over (0.05, 0.95) x its wall time. Prints the kills survived, whether the outputs
match, and the chaos wall time as a ratio of the clean run's. Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = {
    "HF_HUB_OFFLINE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": str(REPO),
    "COLUMNS": "200",
}
def start(root: Path, log: Path, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--preset", args.preset, f"run_root={root}"]
    if args.until:
        cmd += ["--until", args.until]
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)  # always a local Ray of our own: killing it must not hurt others
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(60)


def differences(clean: Path, chaos: Path) -> list[str]:
    """Per stage output: what differs between the two roots (sha256 per file, from the manifests;
    JSON run-root paths and timings excluded: pipelines.cache.compare_outputs)."""
    from pipelines.cache import compare_outputs

    a = {m.parent.relative_to(clean) for m in clean.glob("*/*/_SUCCESS.json")}
    b = {m.parent.relative_to(chaos) for m in chaos.glob("*/*/_SUCCESS.json")}
    out = [f"{d}: only in {'clean' if d in a else 'chaos'}" for d in sorted(a ^ b)]
    for d in sorted(a & b):
        out += [f"{d}/{x}" for x in compare_outputs(clean / d, chaos / d)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=3, help="how many times to kill the driver")
    ap.add_argument("--budget", type=float, default=1800, help="seconds for the whole chaos phase (kills + finish)")
    ap.add_argument("--preset", default="smoke")
    ap.add_argument("--until", default=None, help="only this stage and its upstream (shorter)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="where the two run roots go (default: a temp dir)")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    clean_root, chaos_root, log = work / "clean", work / "chaos", work / "chaos.log"

    t0 = time.time()
    p = start(clean_root, work / "clean.log", args)
    if p.wait() != 0:
        print(f"the clean run failed: see {work / 'clean.log'}")
        return 1
    clean_s = time.time() - t0
    print(f"clean run: {clean_s:.0f}s")

    t0 = time.time()
    kills, attempts = 0, 0
    while kills < args.kills and time.time() - t0 < args.budget - clean_s:
        attempts += 1
        at = rng.uniform(0.05, 0.95) * clean_s
        p = start(chaos_root, log, args)
        try:
            p.wait(at)
            print(f"attempt {attempts}: finished before the kill at {at:.0f}s")
            break  # everything was done already: nothing left to kill
        except subprocess.TimeoutExpired:
            kill_group(p)
            kills += 1
            done = len(list(chaos_root.glob("*/*/_SUCCESS.json")))
            print(f"kill {kills}: after {at:.0f}s ({done} stage outputs complete so far)")
    remaining = max(60.0, args.budget - (time.time() - t0))
    p = start(chaos_root, log, args)
    try:
        rc = p.wait(remaining)
    except subprocess.TimeoutExpired:
        kill_group(p)
        print(f"the final run did not finish within the budget: see {log}")
        return 1
    chaos_s = time.time() - t0
    if rc != 0:
        print(f"the final run failed ({rc}): see {log}")
        return 1
    diffs = differences(clean_root, chaos_root)
    n = len(list(chaos_root.glob("*/*/_SUCCESS.json")))
    left = [str(x.relative_to(chaos_root)) for x in chaos_root.glob("*/*") if x.name.endswith((".tmp", ".lock")) or ".old-" in x.name]
    print(f"survived {kills} kill(s); outputs {'DIFFER' if diffs else 'equal'} to the clean run's "
          f"({n} stage outputs); leftovers: {left or 'none'}")
    for d in diffs:
        print(f"  differs: {d}")
    print(f"chaos wall time / clean wall time: {chaos_s / clean_s:.2f} ({chaos_s:.0f}s / {clean_s:.0f}s)")
    return 0 if not diffs and not left else 1


if __name__ == "__main__":
    sys.exit(main())
