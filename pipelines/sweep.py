"""Sweeps: a grid of pipeline variants as one MLflow experiment, one parent run per cell.

    metamorph sweep conf/experiments/gen_data_scaling.yaml

A sweep file is an experiment file (merged over the preset like `--config`) plus a `sweep:` block:

    sweep:
      preset: tiny                        # default preset for every cell
      grid:                               # the cartesian product of these overrides
        stages.mix.families.generation.max_samples: [100, 400, 1600]
        stages.mix.families.understanding.ratio: [0.0, 1.0]
      plot:                               # optional: one figure, a curve per `series` value
        x: stages.mix.families.generation.max_samples
        y: gen/attr_accuracy              # a metric on each cell's parent run, or a list of
                                          # them (one panel each; y_label a matching list)
        series: stages.mix.families.understanding.ratio   # or a list of keys: a curve per combination
        series_labels: {"0.0": generation only, "1.0": with understanding data}   # list: "v1/v2" keys

Cells share every upstream stage whose key does not change (the cache), so a sweep over mixture
sizes reuses the world, curation and vision-encoder outputs.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path
from typing import Any

import yaml

from pipelines.config import ConfigError, load_config

log = logging.getLogger(__name__)


def read_sweep(path: Path) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    sweep = data.get("sweep")
    if not isinstance(sweep, dict) or not isinstance(sweep.get("grid"), dict) or not sweep["grid"]:
        raise ConfigError(f"{path}: a sweep file needs a `sweep.grid` mapping of key -> list of values")
    for k, v in sweep["grid"].items():
        if not isinstance(v, list) or not v:
            raise ConfigError(f"{path}: sweep.grid.{k} must be a non-empty list")
    unknown = set(sweep) - {"preset", "grid", "plot", "name"}
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in sweep block: {sorted(unknown)}")
    return sweep


def cells(grid: dict[str, list]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def _override(k: str, v: Any) -> str:
    return f"{k}={json.dumps(v) if not isinstance(v, str) else v}"


def run_sweep(
    pipeline_factory,
    path: Path,
    preset: str | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
    *,
    execute_fn,
    say=log.info,
) -> dict[str, Any]:
    """Validate every cell's config first, then run the cells in order with ``execute_fn``
    (``pipelines.commands.execute``: plan, validate, run with the live view); return a summary.
    ``say`` prints a line per cell (the CLI's console)."""
    from pipelines.tracking import make_tracker
    sweep = read_sweep(path)
    preset = preset or sweep.get("preset")
    name = sweep.get("name") or path.stem
    pipeline = pipeline_factory()
    grid_cells = cells(sweep["grid"])
    loaded_cells = []
    for cell in grid_cells:  # every cell's config is checked before the first one runs
        ov = [*(overrides or []), *(_override(k, v) for k, v in cell.items())]
        loaded_cells.append(load_config(pipeline.stages, preset=preset, overrides=ov, experiment_file=path))
    results = []
    for i, (cell, loaded) in enumerate(zip(grid_cells, loaded_cells)):
        label = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in cell.items())
        say(f"sweep {name}: cell {i + 1}/{len(grid_cells)} {label}")
        status, run_id = "finished", None
        try:
            # record_cached: a cell computed by an earlier sweep is still a run to compare here
            summary = execute_fn(pipeline_factory(), loaded, address=address, name=f"{name}[{i}] {label}", record_cached=True)
            run_id = summary.parent_run_id if summary else None
        except SystemExit as e:  # typer.Exit from a failed cell: record it and go on
            status = f"failed ({e})"
        except Exception as e:  # noqa: BLE001 - a failed cell must not stop the grid
            status = f"failed ({type(e).__name__}: {e})"
            if hasattr(e, "exit_code"):
                status = f"failed (exit {e.exit_code})"
        if run_id:
            tracker = make_tracker(loaded)
            tracker.set_tags(run_id, {"sweep": name, "sweep_cell": i, **{f"sweep.{k}": v for k, v in cell.items()}})
        results.append({"cell": i, "params": cell, "status": status, "run_id": run_id})
    out = {"name": name, "cells": results}
    loaded0 = loaded_cells[0]
    sweep_dir = loaded0.run_root / "sweeps" / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tracker = make_tracker(loaded0)
    summary_run = tracker.start_run(f"{name} (summary)", tags={"sweep": name, "sweep_summary": "true"})
    if sweep.get("plot"):
        table = collect(tracker, results, plot_metrics(sweep["plot"]))
        out["table"] = table
        plot_path = sweep_dir / "plot.png"
        plot(table, sweep["plot"], plot_path)
        (sweep_dir / "results.json").write_text(json.dumps(out, indent=2, default=str))
        tracker.client.log_artifact(summary_run.run_id, str(plot_path))
        tracker.client.log_artifact(summary_run.run_id, str(sweep_dir / "results.json"))
        out["plot"] = str(plot_path)
    else:
        (sweep_dir / "results.json").write_text(json.dumps(out, indent=2, default=str))
        tracker.client.log_artifact(summary_run.run_id, str(sweep_dir / "results.json"))
    failed = [r for r in results if r["status"] != "finished"]
    tracker.end(summary_run.run_id, "FAILED" if failed else "FINISHED")
    return out


def plot_metrics(spec: dict[str, Any]) -> list[str]:
    """The plot's y metric(s) as a list."""
    y = spec["y"]
    return [str(m) for m in y] if isinstance(y, (list, tuple)) else [str(y)]


def collect(tracker, results: list[dict], metrics: str | list[str]) -> list[dict[str, Any]]:
    """One row per cell: its grid values, status and the given parent-run metrics (None if absent)."""
    metrics = [metrics] if isinstance(metrics, str) else metrics
    rows = []
    for r in results:
        logged = tracker.client.get_run(r["run_id"]).data.metrics if r["run_id"] else {}
        rows.append({**r["params"], **{m: logged.get(m) for m in metrics}, "status": r["status"]})
    return rows


def plot(table: list[dict], spec: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, series = spec["x"], spec.get("series")
    ys = plot_metrics(spec)
    y_labels = spec.get("y_label", ys)
    y_labels = [y_labels] if isinstance(y_labels, str) else list(y_labels)
    if len(y_labels) != len(ys):
        raise ConfigError(f"sweep.plot.y_label: {len(y_labels)} labels for {len(ys)} metrics")
    labels = {str(k): v for k, v in (spec.get("series_labels") or {}).items()}
    fig, axes = plt.subplots(1, len(ys), figsize=(6 * len(ys), 4.6), dpi=120, squeeze=False)
    # series: one key, or a list of keys (a curve per combination, labelled "v1/v2")
    keys = [series] if isinstance(series, str) else list(series or [])
    groups: dict[Any, list] = {}
    for row in table:
        groups.setdefault("/".join(str(row.get(k)) for k in keys) if keys else "all", []).append(row)
    series = "/".join(keys) if keys else None
    for ax, y, y_label in zip(axes[0], ys, y_labels):
        for key, rows in sorted(groups.items(), key=lambda kv: str(kv[0])):
            pts = sorted((r[x], r[y]) for r in rows if r.get(y) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=labels.get(str(key), f"{series}={key}"))
        ax.set_xscale("log")
        ax.set_xlabel(spec.get("x_label", x))
        ax.set_ylabel(y_label)
        ax.grid(alpha=0.3)
    fig.suptitle(spec.get("title", "sweep"))
    handles, names = axes[0][0].get_legend_handles_labels()
    if handles:  # one legend for every panel (same curves, same colours), below them
        fig.legend(handles, names, loc="lower center", ncol=min(2, len(handles)), frameon=False)
    rows = (len(handles) + 1) // 2
    fig.tight_layout(rect=(0, 0.06 * rows + 0.02, 1, 1))
    fig.savefig(out)
    plt.close(fig)
