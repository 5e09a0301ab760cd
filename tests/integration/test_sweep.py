"""Sweeps: a grid of cells, one parent run each, shared upstream through the cache, a plot."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from pipelines.config import ConfigError
from pipelines.commands import execute
from pipelines.sweep import read_sweep, run_sweep
from pipelines.tracking import default_uri
from tests.integration.engine.toy_stages import toy_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_sweep_grid_shares_cache_and_plots(ray_session, tmp_path):
    f = tmp_path / "sw.yaml"
    f.write_text(
        f"""
run_root: {tmp_path / 'root'}
experiment: toy-sweep
sweep:
  grid:
    stages.numbers.n: [5, 10]
    stages.letters.text: [ab, abcd]
  plot: {{x: stages.numbers.n, y: stages_ran, series: stages.letters.text}}
"""
    )
    out = run_sweep(toy_pipeline, f, preset=None, execute_fn=execute)
    assert [c["status"] for c in out["cells"]] == ["finished"] * 4
    assert (tmp_path / "root" / "sweeps" / "sw" / "plot.png").stat().st_size > 1000
    client = MlflowClient(default_uri(tmp_path / "root"))
    exp = client.get_experiment_by_name("toy-sweep")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sweep_cell")]
    assert len(parents) == 4
    ran = sorted(int(r.data.metrics["stages_ran"]) for r in parents)
    # cell 0 runs all 4 stages; later cells reuse cached numbers/scale or letters
    assert ran[-1] == 4 and sum(ran) < 16
    summary = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sweep_summary")]
    assert {a.path for a in client.list_artifacts(summary[0].info.run_id)} >= {"plot.png", "results.json"}


def test_bad_sweep_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("sweep:\n  grid: {}\n")
    with pytest.raises(ConfigError, match="sweep.grid"):
        read_sweep(f)
    f.write_text("sweep:\n  grid:\n    stages.numbers.nope: [1]\n")
    with pytest.raises(ConfigError, match="stages.numbers.nope"):
        run_sweep(toy_pipeline, f, execute_fn=execute)
