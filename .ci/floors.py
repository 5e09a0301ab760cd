"""Print pip constraints pinning every direct dependency to its declared floor (``name==floor``).

    python .ci/floors.py --except torch > /tmp/floors.txt
    pip install -e ".[test]" --constraint /tmp/floors.txt

The floors venv of .ci/run installs these, so a floor in pyproject.toml is one the fast test tier
has passed on, not a guess. A dependency without a ``>=`` floor is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

SPEC = re.compile(r"^\s*([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(.*)$")


def floors(pyproject: Path, extras: list[str]) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    deps = list(project["dependencies"])
    for e in extras:
        deps += project.get("optional-dependencies", {}).get(e, [])
    out = {}
    for d in deps:
        m = SPEC.match(d)
        name, spec = m.group(1).lower(), m.group(3)
        lo = re.search(r">=\s*([0-9][^,;\s]*)", spec)
        if lo is None:
            sys.exit(f"{pyproject}: dependency {d!r} has no >= floor")
        out[name] = lo.group(1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pyproject", type=Path, default=Path(__file__).resolve().parents[1] / "pyproject.toml")
    ap.add_argument("--extra", action="append", default=["test"], help="optional-dependency groups to include")
    ap.add_argument("--except", dest="skip", action="append", default=[], help="leave this one unpinned")
    args = ap.parse_args()
    for name, floor in floors(args.pyproject, args.extra).items():
        if name not in args.skip:
            print(f"{name}=={floor}")


if __name__ == "__main__":
    main()
