"""Remembered resolutions: a repeated `metamorph plan` or fully cached `metamorph run` answers
without loading the config or the stage code.

    metamorph plan --preset smoke     # first time: config + stage code -> cache keys (~0.3 s)
    metamorph plan --preset smoke     # again: the keys are remembered; only the run root is read
    METAMORPH_CLI_CACHE=0 metamorph plan --preset smoke   # always resolve from scratch

What a plan needs from the config and the stage code (the DAG's order and edges, each stage's
cache key, the selection; ``Engine.graph_facts``) is a function of the command line, the
working directory, the environment, the config files and the code. The first invocation stores
it, with the size and mtime of every file it depended on: every module Python had loaded (ours
and the libraries') and every config file read. The next identical invocation stats those
files and uses the stored facts only if none changed (Python's own bytecode cache trusts the
same two numbers). What can change between two invocations, the run root's outputs, is always
read live: ``planning.decide`` checks every manifest, so a deleted or damaged output is seen.

Not remembered: configs whose cache keys fingerprint external files (a checkpoint, a dataset
annotation file; ``Stage.fingerprint``), since those fingerprints are computed by stage code;
such commands always resolve from scratch. The store is ``$XDG_CACHE_HOME/metamorph/cli``
(``~/.cache/...``), one small JSON file per distinct command, the oldest pruned past 256.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

VERSION = 1  # bump when the stored payload changes meaning
MAX_ENTRIES = 256
ENV_SWITCH = "METAMORPH_CLI_CACHE"  # "0": never read or write remembered resolutions

# The command line of this invocation and the environment it started with, when it came in
# through ``pipelines.cli.main`` (the commands remember their resolution under both); None when
# the commands are driven some other way (tests calling ``execute``).
ARGV: list[str] | None = None
ENV: dict[str, str] | None = None


def begin(argv: list[str], env: dict[str, str]) -> None:
    global ARGV, ENV
    ARGV, ENV = list(argv), dict(env)


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def store_dir() -> Path:
    """``$METAMORPH_CLI_CACHE_DIR``, else ``$XDG_CACHE_HOME/metamorph/cli`` (``~/.cache/...``)."""
    if os.environ.get("METAMORPH_CLI_CACHE_DIR"):
        return Path(os.environ["METAMORPH_CLI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "metamorph" / "cli"


def _identity(argv: list[str], env: dict[str, str] | None) -> str:
    """Everything besides files that a resolution depends on, as one digest: the interpreter,
    the command line, the working directory and the whole environment as the command started
    (``env``; values are hashed, not stored: they may hold secrets)."""
    import hashlib

    env = dict(os.environ) if env is None else env
    h = hashlib.sha256()
    h.update(json.dumps([VERSION, sys.executable, sys.version, os.getcwd(), list(argv), sorted(env.items())]).encode())
    return h.hexdigest()


def _stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _loaded_files() -> set[str]:
    out = set()
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.isabs(f):
            out.add(f)
    return out


def recall(argv: list[str], env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The payload stored for this exact invocation, or None (never stored, or any file it
    depended on changed, or the store is unreadable). ``env``: the environment the command
    started with (default: the current one)."""
    if not enabled():
        return None
    ident = _identity(argv, env)
    try:
        with open(store_dir() / f"{ident[:32]}.json") as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    if entry.get("version") != VERSION or entry.get("identity") != ident:
        return None
    for path, stamp in entry["files"].items():
        if _stat(path) != stamp:
            return None
    return entry["payload"]


def remember(argv: list[str], payload: dict[str, Any], files: Iterable[str | Path] = (),
             env: dict[str, str] | None = None) -> None:
    """Store ``payload`` for this invocation, depending on ``files`` and every loaded module.
    Best effort: a store that cannot be written only costs the next invocation its speed."""
    if not enabled():
        return
    deps = {str(p) for p in files} | _loaded_files()
    stamps = {p: _stat(p) for p in sorted(deps)}
    ident = _identity(argv, env)
    entry = {"version": VERSION, "identity": ident, "files": stamps, "payload": payload}
    d = store_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{ident[:32]}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(entry, default=str))
        os.replace(tmp, d / f"{ident[:32]}.json")
        entries = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for old in entries[:-MAX_ENTRIES]:
            old.unlink(missing_ok=True)
    except OSError:
        pass


def payload(facts: dict[str, Any], run_root: Path, selected, forced, verify: bool, **options: Any) -> dict[str, Any]:
    """What a `plan`/`run` remembers: ``Engine.graph_facts`` plus the checked selection and the
    options that shape the output (``command``, ``as_json`` / ``verbosity``, ``name``, ``preset``,
    ``capture``)."""
    return {"facts": facts, "run_root": str(run_root), "selected": sorted(selected), "forced": sorted(forced),
            "verify": verify, **options}


def answer(argv: list[str]) -> int | None:
    """Exit code of ``argv`` answered from its remembered resolution, or None: not remembered,
    something it depended on changed, or it needs the full path (a stage must run, an error)."""
    stored = recall(argv, ENV)
    if stored is None:
        return None
    from pipelines.planning import RUN, GraphError, decide, run_cached

    try:
        items = decide(**stored["facts"], run_root=Path(stored["run_root"]), selected=stored["selected"],
                       forced=stored["forced"], verify_hashes=stored["verify"])
    except GraphError:
        return None  # the full path reports it, naming the stage
    if stored["command"] == "plan":
        from pipelines.console import print_plan

        print_plan(items, as_json=stored["as_json"])
        return 0
    if any(it.action == RUN for it in items):
        return None  # Ray, MLflow, the stage code: the full path
    run_cached(items, Path(stored["run_root"]), stored["verbosity"], stored["name"], stored["preset"],
                      stored["capture"])
    return 0


def forget() -> int:
    """Remove every remembered resolution; returns how many there were."""
    n = 0
    for p in store_dir().glob("*.json"):
        p.unlink(missing_ok=True)
        n += 1
    return n
