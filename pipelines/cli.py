"""The `metamorph` command.

    metamorph run                         # the whole pipeline, tiny preset, local Ray + MLflow
    metamorph run --preset smoke --only tokenize --force tokenize
    metamorph plan --preset smoke         # what would run, what is cached
    metamorph stages                      # every stage: inputs, outputs, config fields
    metamorph ui                          # MLflow UI on 127.0.0.1 over the run root's store
"""

from __future__ import annotations

import os

# Set before ray/transformers import anywhere: no hub downloads, no usage stats.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines.config import ConfigError, LoadedConfig, load_config, to_plain
from pipelines.graph import GraphError, Pipeline

app = typer.Typer(
    help="MetaMorph: Visual-Predictive Instruction Tuning as a Ray + MLflow pipeline.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, highlight=False)

OVERRIDES = typer.Argument(None, help="config overrides, dotted key=value (e.g. stages.world.n_generation=100)")
PRESET = typer.Option("tiny", "--preset", "-p", help="conf/presets/NAME.yaml (smoke, tiny, cluster) or a YAML path")
EXPERIMENT = typer.Option(None, "--config", "-c", help="an experiment YAML merged over the preset")
PIPELINE = typer.Option("vpit", "--pipeline", help="which pipeline definition (pipelines/definitions.py)")


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def load(pipeline_name: str, preset: str | None, overrides, experiment) -> tuple[Pipeline, LoadedConfig]:
    from pipelines.definitions import get_pipeline

    try:
        pipeline = get_pipeline(pipeline_name)
        loaded = load_config(pipeline.stages, preset=preset, overrides=list(overrides or []), experiment_file=experiment)
    except (ConfigError, GraphError, ValueError) as e:
        _fail(str(e))
    return pipeline, loaded


def make_engine(pipeline: Pipeline, loaded: LoadedConfig):
    from pipelines.runner import Engine

    try:
        return Engine(pipeline, loaded)
    except (GraphError, ConfigError, ValueError) as e:
        _fail(str(e))


def make_tracker(loaded: LoadedConfig):
    from pipelines.tracking import Tracker, default_artifact_root, default_uri

    t = loaded.typed.tracking
    uri = t.uri or default_uri(loaded.run_root)
    art = t.artifact_root or (default_artifact_root(loaded.run_root) if t.uri is None else None)
    loaded.run_root.mkdir(parents=True, exist_ok=True)
    from pipelines.lock import StageLock

    # two runs starting on one run root would both create (migrate) the sqlite store and the
    # experiment; MLflow's migration is not safe against that, so the first one does it alone
    with StageLock(loaded.run_root / "mlflow.db.lock", timeout_s=60, heartbeat_s=5):
        return Tracker(uri, loaded.typed.experiment, art)


def print_plan(plan) -> None:
    table = Table(title="plan", show_lines=False)
    for col in ("#", "stage", "key", "action", "why"):
        table.add_column(col)
    style = {"run": "bold yellow", "cached": "green", "skip": "dim"}
    for i, it in enumerate(plan, 1):
        table.add_row(str(i), it.name, it.key, f"[{style[it.action]}]{it.action}[/]", it.reason)
    console.print(table)


def execute(
    pipeline: Pipeline,
    loaded: LoadedConfig,
    only=(),
    from_=None,
    until=None,
    force=(),
    address=None,
    name=None,
    dry_run: bool = False,
    verify: bool = False,
):
    """Plan, validate, start Ray and MLflow, run. The CLI and the tests both go through here."""
    from pipelines.runner import StageFailed, init_ray

    engine = make_engine(pipeline, loaded)
    try:
        plan = engine.plan(only=only, from_=from_, until=until, force=force, verify=verify)
        if not dry_run:  # a dry run collects every problem instead of stopping at the first
            engine.validate_stages(plan)
    except (GraphError, ConfigError, ValueError) as e:
        _fail(str(e))
    print_plan(plan)
    if dry_run:
        from pipelines.resources import dry_run as check

        report = check(engine, plan, loaded, lambda: init_ray(loaded.typed.ray, address=address))
        table = Table(title="resources per stage (peak, at once)")
        for col in ("stage", "action", "needs"):
            table.add_column(col)
        for row in report.rows:
            table.add_row(*row)
        console.print(table)
        console.print(f"ray: {report.cluster}; run root: {loaded.run_root}")
        for w in report.warnings:
            console.print(f"[yellow]warning:[/] {w}")
        for p in report.problems:
            console.print(f"[red]problem:[/] {p}")
        if report.problems:
            console.print(f"[bold red]dry run: {len(report.problems)} problem(s); nothing was run[/]")
            raise typer.Exit(1)
        console.print("[green]dry run: config, paths and resources check out; nothing was run[/]")
        return None
    where = init_ray(loaded.typed.ray, address=address)
    console.print(f"ray: {where}; run root: {loaded.run_root}")
    tracker = make_tracker(loaded)
    t0 = time.time()

    def on_event(stage: str, event: str, detail: str) -> None:
        colour = {"start": "yellow", "done": "green", "cached": "green", "failed": "red", "blocked": "red",
                  "waiting": "cyan", "damaged": "red"}.get(event, "white")
        console.print(f"[dim]{time.time() - t0:7.1f}s[/] [{colour}]{event:>7}[/] {stage}  [dim]{detail}[/]")

    try:
        summary = engine.run(plan, tracker=tracker, run_name=name, on_event=on_event)
    except StageFailed as e:
        console.print(f"[bold red]pipeline failed[/]\n{e}")
        console.print("finished stages are kept; rerun the same command to continue from them")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: running stages left no manifest; rerun to continue")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # stage threads may sit inside Ray calls; do not wait for them
    console.print(
        f"[bold green]done[/] in {time.time() - t0:.1f}s: "
        + ", ".join(f"{n}={s}" for n, s in summary.statuses.items())
    )
    console.print(f"mlflow run: {summary.parent_run_id}  (metamorph ui --run-root {loaded.run_root})")
    return summary


@app.command()
def run(
    overrides: Optional[List[str]] = OVERRIDES,
    preset: str = PRESET,
    config: Optional[Path] = EXPERIMENT,
    only: List[str] = typer.Option([], "--only", help="run only these stages (upstream must be cached)"),
    from_: Optional[str] = typer.Option(None, "--from", help="run this stage and everything downstream"),
    until: Optional[str] = typer.Option(None, "--until", help="run this stage and everything upstream"),
    force: List[str] = typer.Option([], "--force", help="rerun these stages (and their downstream) even if cached; 'all' for every selected stage"),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    name: Optional[str] = typer.Option(None, "--name", help="MLflow parent run name"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate config, paths and cluster resources; print the plan; run nothing"),
    verify: bool = typer.Option(False, "--verify", help="check cached outputs against their sha256 first (not just sizes); damaged ones are recomputed"),
    pipeline: str = PIPELINE,
) -> None:
    """Run the pipeline (cached stages are skipped)."""
    p, loaded = load(pipeline, preset, overrides, config)
    execute(p, loaded, only=only, from_=from_, until=until, force=force, address=address, name=name, dry_run=dry_run,
            verify=verify)


@app.command("verify")
def verify_cmd(
    stage_names: Optional[List[str]] = typer.Argument(None, help="stages to check (default: all)"),
    preset: str = PRESET,
    run_root: Optional[Path] = typer.Option(None, "--run-root", help="default: the preset's run_root"),
    move_aside: bool = typer.Option(True, "--move-aside/--report-only", help="rename damaged outputs to {key}.damaged-* so the next run recomputes them"),
    pipeline: str = PIPELINE,
) -> None:
    """Check every promoted output under the run root against its manifest's sizes and sha256."""
    from pipelines.cache import verify_tree

    p, loaded = load(pipeline, preset, [], None)
    root = (run_root or loaded.run_root).expanduser().resolve()
    known = sorted({s.name for s in p.stages} | {d.name for d in root.glob("*") if d.is_dir()})
    unknown = [s for s in stage_names or [] if s not in known]
    if unknown:
        _fail(f"unknown stage(s) {unknown}; stages: {known}")
    eng = loaded.typed.engine
    rows = verify_tree(root, stage_names or known, move_aside=move_aside, lock_timeout_s=eng.lock_timeout_s)
    out = Console()
    bad = 0
    for stage, key, problems, note in rows:
        if problems:
            bad += 1
            out.print(f"[red]DAMAGED[/] {stage}/{key}: {len(problems)} problem(s){note}")
            for pr in problems:
                out.print(f"    {pr}")
        else:
            out.print(f"[green]ok[/]      {stage}/{key}{note}")
    out.print(f"{len(rows)} output(s) checked under {root}, {bad} damaged")
    if bad:
        raise typer.Exit(1)


@app.command()
def plan(
    overrides: Optional[List[str]] = OVERRIDES,
    preset: str = PRESET,
    config: Optional[Path] = EXPERIMENT,
    only: List[str] = typer.Option([], "--only"),
    from_: Optional[str] = typer.Option(None, "--from"),
    until: Optional[str] = typer.Option(None, "--until"),
    force: List[str] = typer.Option([], "--force"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable plan on stdout"),
    pipeline: str = PIPELINE,
) -> None:
    """Show the DAG in order with each stage's cache key and whether it would run."""
    p, loaded = load(pipeline, preset, overrides, config)
    engine = make_engine(p, loaded)
    try:
        items = engine.plan(only=only, from_=from_, until=until, force=force)
    except (GraphError, ValueError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps([{"stage": i.name, "key": i.key, "action": i.action, "reason": i.reason, "out_dir": str(i.out_dir)} for i in items], indent=2))
    else:
        print_plan(items)


@app.command()
def stages(pipeline: str = PIPELINE) -> None:
    """List every stage: version, inputs, outputs, config fields with defaults."""
    from pipelines.definitions import get_pipeline

    p = get_pipeline(pipeline)
    out = Console()
    for s in p.stages:
        cfg = s.config_cls()
        out.print(f"[bold]{s.name}[/] v{s.version}  inputs={list(s.input_artifacts(cfg))} outputs={list(s.outputs)}"
                  + ("  [resumable]" if s.resumable else ""))
        doc = (s.__doc__ or "").strip().splitlines()
        if doc:
            out.print(f"  {doc[0]}")
        for f in dataclasses.fields(cfg):
            val = json.dumps(to_plain(getattr(cfg, f.name)), default=str)
            if len(val) > 100:
                val = val[:97] + "..."
            op = " (operational)" if f.name in s.operational else ""
            out.print(f"    {f.name}: {val}{op}")


@app.command()
def sweep(
    file: Path = typer.Argument(..., help="a sweep YAML (conf/experiments/...) with a `sweep:` block"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value applied to every cell"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="overrides the sweep file's preset"),
    address: Optional[str] = typer.Option(None, "--address"),
    pipeline: str = PIPELINE,
) -> None:
    """Run a grid of pipeline variants (one MLflow parent run per cell, shared cache)."""
    from pipelines.definitions import PIPELINES
    from pipelines.sweep import run_sweep

    if pipeline not in PIPELINES:
        _fail(f"unknown pipeline {pipeline!r}")
    try:
        out = run_sweep(PIPELINES[pipeline], file, preset=preset, overrides=list(overrides or []), address=address)
    except (ConfigError, GraphError) as e:
        _fail(str(e))
    for c in out["cells"]:
        console.print(f"cell {c['cell']}: {c['params']} -> {c['status']}")
    if "plot" in out:
        console.print(f"plot: {out['plot']}")
    if any(c["status"] != "finished" for c in out["cells"]):
        raise typer.Exit(1)


@app.command()
def ui(
    run_root: Path = typer.Option(Path("./runs"), "--run-root", help="the run root whose MLflow store to show"),
    port: int = typer.Option(5000, "--port"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address; 127.0.0.1 unless you mean to expose it"),
    uri: Optional[str] = typer.Option(None, "--uri", help="another tracking URI instead of the run root's store"),
) -> None:
    """Start the MLflow UI over the pipeline's store (foreground; Ctrl-C stops it)."""
    from pipelines.tracking import default_uri

    store = uri or default_uri(run_root)
    if uri is None and not (run_root / "mlflow.db").exists():
        _fail(f"no MLflow store at {run_root / 'mlflow.db'}; run the pipeline first or pass --run-root")
    console.print(f"MLflow UI for {store} at http://{host}:{port}")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", host, "--port", str(port), "--workers", "1"]
    os.execvp(cmd[0], cmd)


from pipelines.infer import register as _register_infer  # noqa: E402  (generate, chat)

_register_infer(app)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
