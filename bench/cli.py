"""How fast the CLI answers: `--help`, `plan` and a fully cached `run`, as ratios to a bare
`python -c "import pipelines"` measured in the same run (target: plan and cached run <= 3x).

    python bench/cli.py                        # does one smoke run first if --run-root has none
    python bench/cli.py --run-root /tmp/smoke --repeat 5

Each command runs in a fresh interpreter, ``--repeat`` times; the median wall time is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(cmd: list[str], env: dict[str, str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-root", type=Path, default=None, help="a run root holding a finished smoke run")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    root = args.run_root or Path(tempfile.mkdtemp(prefix="bench-cli-"))
    cli = [sys.executable, "-m", "pipelines.cli"]
    smoke = ["--preset", "smoke", "--run-root", str(root)]
    if not (root / "mlflow.db").exists():
        print(f"no smoke run under {root}: running one first (a few minutes)", flush=True)
        subprocess.run([*cli, "run", *smoke, "-q"], cwd=ROOT, env=env, check=True)
    wall([*cli, "run", *smoke, "-q"], env, 1)  # make sure everything is cached (and warm the disk cache)
    base = wall([sys.executable, "-c", "import pipelines"], env, args.repeat)
    rows = {
        "metamorph --help": wall([*cli, "--help"], env, args.repeat),
        "metamorph plan": wall([*cli, "plan", *smoke], env, args.repeat),
        "metamorph run (fully cached)": wall([*cli, "run", *smoke, "-q"], env, args.repeat),
    }
    print(f"baseline  python -c 'import pipelines': {base:.3f}s (median of {args.repeat})")
    for name, t in rows.items():
        print(f"{name:30s} {t:7.3f}s  {t / base:6.1f}x baseline")


if __name__ == "__main__":
    main()
