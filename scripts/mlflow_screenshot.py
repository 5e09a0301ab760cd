"""Screenshots of the MLflow UI for a run root: the runs table, and one evaluate run's tables.

    python scripts/mlflow_screenshot.py --run-root runs --out docs
    # -> docs/mlflow_runs.png, docs/mlflow_evaluate_table.png, docs/mlflow_logged_model.png

Starts a real ``mlflow server`` on 127.0.0.1 over the run root's store (as ``metamorph ui``
does), then headless Chromium (``apt-get install chromium``; or --chromium PATH) loads each page
and saves a PNG. The pages: the experiment's runs table (the pipeline runs with their headline
metrics and the Dataset column), the newest evaluate run's ``eval_generation_table.json`` artifact
(caption, generated image, judged attributes per sample), and the VPiT logged model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, timeout_s: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the MLflow server did not answer at {url} within {timeout_s:.0f}s")


def _shoot(chromium: str, url: str, out: Path, size: str, wait_ms: int) -> None:
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
               f"--screenshot={out}", url]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
    from PIL import Image

    with Image.open(out) as im:  # a 256-colour palette: a UI capture loses nothing visible, ~4x smaller
        small = im.convert("RGB").quantize(256)
    small.save(out, optimize=True)
    print(f"{out}  <- {url}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-root", type=Path, default=Path("runs"))
    ap.add_argument("--experiment", default="metamorph")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--size", default="1920,1000", help="window size in px, W,H")
    ap.add_argument("--wait-ms", type=int, default=20000, help="virtual time the page gets to render")
    args = ap.parse_args()

    from mlflow import MlflowClient

    from pipelines.tracking import default_uri

    uri = default_uri(args.run_root)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"no experiment {args.experiment!r} in {uri}: run the pipeline first")
    evals = client.search_runs([exp.experiment_id], "tags.stage = 'evaluate' and tags.status = 'ran'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    models = [m for m in client.search_logged_models([exp.experiment_id]) if m.name == "vpit_model"]

    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base + "/health")
        args.out.mkdir(parents=True, exist_ok=True)
        e = exp.experiment_id
        _shoot(args.chromium, f"{base}/#/experiments/{e}/runs", args.out / "mlflow_runs.png", args.size, args.wait_ms)
        if evals:
            r = evals[0].info.run_id
            _shoot(args.chromium, f"{base}/#/experiments/{e}/runs/{r}/artifacts/eval_generation_table.json",
                   args.out / "mlflow_evaluate_table.png", args.size, args.wait_ms)
        if models:
            _shoot(args.chromium, f"{base}/#/experiments/{e}/models/{models[0].model_id}",
                   args.out / "mlflow_logged_model.png", args.size, args.wait_ms)
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
