"""Behaviour fingerprint of the smoke preset: run the whole DAG into a fresh run root and write a
JSON of content hashes per stage output, to show a refactor changed nothing.

    python bench/smoke_fingerprint.py --out /tmp/fp_before.json            # run smoke, fingerprint it
    python bench/smoke_fingerprint.py --root runs/smoke --out fp.json      # fingerprint an existing root
    python bench/smoke_fingerprint.py --compare fp_before.json fp_after.json   # list differences

What is hashed, per stage (keyed by stage name, so a changed cache key shows as a key change and
the file hashes are still compared):
* every file the manifest lists, by sha256 of its bytes;
* Parquet files also by a content hash of their rows (schema + values, independent of writer
  metadata), so a byte difference that is only pyarrow metadata is told apart from other rows;
* safetensors files also by a hash of their tensors (name, dtype, shape, bytes), so weights after
  the fixed number of steps are compared regardless of header metadata;
* JSON files also with run-root paths and wall-clock timings removed (pipelines.cache's
  volatile keys: ``_name_or_path``, ``*seconds``, ``*_at``), which is what metrics are compared by.

Excluded, because they differ run to run by nature: the manifest itself (times, MLflow run id, run
root), ``report.html`` (renders a wall-clock time; compared by presence), raw JSON bytes where the
stripped JSON is equal, and the logs/ and mlflow store under the run root. Compare exits 1 if any
stage's content differs; a key difference alone is reported but is the expected effect of a
deliberate cache-key change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from chaos import ENV  # noqa: E402  (the same environment as the chaos bench's smoke runs)
TIMED = ("report.html",)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parquet_rows(path: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema.remove_metadata()) as w:
        w.write_table(table.replace_schema_metadata(None).combine_chunks())
    return _sha(sink.getvalue().to_pybytes())


def safetensors_tensors(path: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def json_stripped(path: Path) -> str:
    from pipelines.cache import _strip_volatile

    return _sha(json.dumps(_strip_volatile(json.loads(path.read_text())), sort_keys=True).encode())


def fingerprint(root: Path) -> dict:
    out: dict = {}
    for manifest in sorted(root.glob("*/*/_SUCCESS.json")):
        d = manifest.parent
        stage, key = d.parent.name, d.name
        m = json.loads(manifest.read_text())
        files: dict = {}
        for f in sorted(m["files"], key=lambda f: f["path"]):
            p, rec = d / f["path"], {}
            if f["path"].endswith(TIMED):
                rec["present"] = True
            elif f["path"].endswith(".json"):
                rec["json"] = json_stripped(p)
            else:
                rec["sha256"] = f["sha256"]
            if p.suffix == ".parquet":
                rec["rows"] = parquet_rows(p)
            if p.suffix == ".safetensors":
                rec["tensors"] = safetensors_tensors(p)
            files[f["path"]] = rec
        out.setdefault(stage, []).append({"key": key, "files": files})
    return out


def run_smoke(root: Path, seed: int) -> None:
    cmd = [sys.executable, "-m", "pipelines.cli", "run", "--preset", "smoke", "--quiet",
           f"run_root={root}", f"seed={seed}"]
    env = {**os.environ, **ENV}
    env.pop("RAY_ADDRESS", None)
    log = root.parent / f"{root.name}.log"
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"smoke run failed (exit {rc}); see {log}")


def compare(a: dict, b: dict) -> tuple[list[str], list[str]]:
    """(content differences, key-only differences)."""
    content, keys = [], []
    for stage in sorted(set(a) | set(b)):
        if stage not in a or stage not in b:
            content.append(f"{stage}: only in {'A' if stage in a else 'B'}")
            continue
        if len(a[stage]) != 1 or len(b[stage]) != 1:
            content.append(f"{stage}: {len(a[stage])} vs {len(b[stage])} outputs (use fresh run roots)")
            continue
        oa, ob = a[stage][0], b[stage][0]
        if oa["key"] != ob["key"]:
            keys.append(f"{stage}: cache key {oa['key']} -> {ob['key']}")
        fa, fb = oa["files"], ob["files"]
        for p in sorted(set(fa) ^ set(fb)):
            content.append(f"{stage}/{p}: only in {'A' if p in fa else 'B'}")
        for p in sorted(set(fa) & set(fb)):
            for k in sorted(set(fa[p]) | set(fb[p])):
                if fa[p].get(k) != fb[p].get(k):
                    content.append(f"{stage}/{p}: {k} {str(fa[p].get(k))[:12]} vs {str(fb[p].get(k))[:12]}")
    return content, keys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where to write the fingerprint JSON")
    ap.add_argument("--root", type=Path, default=None, help="fingerprint this existing run root instead of running smoke")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        content, keys = compare(a, b)
        for line in keys:
            print("key   ", line)
        for line in content:
            print("DIFF  ", line)
        n = sum(len(v[0]["files"]) for v in a.values())
        print(f"{len(a)} stages, {n} files: {len(content)} content differences, {len(keys)} key changes")
        return 1 if content else 0
    if args.out is None:
        ap.error("--out is required unless --compare")
    root = args.root
    if root is None:
        root = Path(tempfile.mkdtemp(prefix="fp-")) / "root"
        run_smoke(root, args.seed)
    fp = fingerprint(root)
    args.out.write_text(json.dumps(fp, indent=1, sort_keys=True) + "\n")
    print(f"{len(fp)} stages fingerprinted from {root} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
