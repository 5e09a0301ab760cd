"""How fast the CLI answers: `--help`, `plan` and a fully cached `run`, as ratios to a bare
`python -c "import pipelines"` measured in the same run (target: plan and cached run <= 3x).

`plan` and `run` are measured twice: as a repeated command answers (its resolution remembered,
``pipelines.memo``) and resolved from scratch (``METAMORPH_CLI_CACHE=0``: config, stage code and
typer loaded, as the first time a command is typed or after the code or a config file changed).

    python bench/cli.py                        # does one smoke run first if --run-root has none
    python bench/cli.py --run-root /tmp/smoke --repeat 7

Each command runs in a fresh interpreter ``--repeat`` times; the best (lowest) wall time and CPU
time (user + system of the child) are reported: on a shared machine the minimum is the figure
least disturbed by other load, and CPU time moves less with load than wall time does. Python may
write bytecode caches as an installed package has them (``PYTHONDONTWRITEBYTECODE`` is dropped
for the measured commands, which are run once first): without them every run recompiles our
~150 modules, which is not what a user sees.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def measure(cmd: list[str], env: dict[str, str], repeat: int) -> tuple[float, float]:
    """(best wall seconds, best CPU seconds) of ``repeat`` runs of ``cmd``."""
    walls, cpus = [], []
    for _ in range(repeat):
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        walls.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        if r.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-2000:]}")
    return min(walls), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-root", type=Path, default=None, help="a run root holding a finished smoke run")
    ap.add_argument("--repeat", type=int, default=7, help="runs per command; the best is reported")
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_CACHE_HOME=tempfile.mkdtemp(prefix="bench-cli-cache-"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("METAMORPH_CLI_CACHE", None)
    scratch = dict(env, METAMORPH_CLI_CACHE="0")
    root = args.run_root or Path(tempfile.mkdtemp(prefix="bench-cli-"))
    cli = [sys.executable, "-m", "pipelines.cli"]
    smoke = ["--preset", "smoke", "--run-root", str(root)]
    if not (root / "mlflow.db").exists():
        print(f"no smoke run under {root}: running one first (a few minutes)", flush=True)
        subprocess.run([*cli, "run", *smoke, "-q"], cwd=ROOT, env=env, check=True)
    commands = {
        "metamorph --help": ([*cli, "--help"], env),
        "metamorph plan": ([*cli, "plan", *smoke], env),
        "metamorph run (fully cached)": ([*cli, "run", *smoke, "-q"], env),
        "  plan, resolved from scratch": ([*cli, "plan", *smoke], scratch),
        "  run, resolved from scratch": ([*cli, "run", *smoke, "-q"], scratch),
    }
    for cmd, cenv in commands.values():  # bytecode written, files in the page cache, resolutions remembered
        measure(cmd, cenv, 1)
    base_wall, base_cpu = measure([sys.executable, "-c", "import pipelines"], env, args.repeat)
    print(f"baseline  python -c 'import pipelines': wall {1000 * base_wall:.0f} ms, cpu {1000 * base_cpu:.0f} ms (best of {args.repeat})")
    for name, (cmd, cenv) in commands.items():
        wall, cpu = measure(cmd, cenv, args.repeat)
        print(f"{name:30s} wall {1000 * wall:6.0f} ms {wall / base_wall:5.1f}x   cpu {1000 * cpu:6.0f} ms {cpu / base_cpu:5.1f}x")


if __name__ == "__main__":
    main()
