"""The `metamorph` commands (typer); ``pipelines.cli.main`` is the entry point.

    metamorph run --preset smoke          # see pipelines/cli.py for more

On a terminal `run` shows one table of stages that updates in place (``pipelines.console``);
off one, a line per event. Ray, worker and library output goes to
``{run_root}/logs/<run name>/<stage>.log`` (``-v`` shows it live, ``-q`` only errors and the
summary). Only what a command needs is imported: `--help`, `plan`, `stages` and a fully cached
`run` load no torch and start no Ray; `plan` and `run` remember their resolution for the next
identical command (``pipelines.memo``).
"""

from __future__ import annotations

import os

import pipelines.env  # noqa: F401  (environment defaults, before ray or transformers are imported)

import contextlib
import dataclasses
import functools
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipelines import memo
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
RUN_ROOT_OPT = typer.Option(None, "--run-root", help="where outputs, logs and the MLflow store live (same as run_root=PATH)")
ONLY = typer.Option([], "--only", help="select only these stages (their upstream must be cached); repeatable")
FROM = typer.Option(None, "--from", help="select this stage and everything downstream of it")
UNTIL = typer.Option(None, "--until", help="select this stage and everything upstream of it")
FORCE = typer.Option([], "--force", help="rerun these stages (and their downstream) even if cached; 'all' for every selected stage")
VERBOSE = typer.Option(False, "--verbose", "-v", help="also show every log line (Ray, workers, stages) as it is written")
QUIET = typer.Option(False, "--quiet", "-q", help="show only errors and the final summary")


def _with_run_root(overrides, run_root: Optional[Path]) -> list[str]:
    out = list(overrides or [])
    if run_root is not None:
        out.append(f"run_root={run_root}")
    return out


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


def print_plan(plan) -> None:
    from pipelines.console import print_plan as show

    show(plan)


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
    verbosity: int | None = None,
    capture: bool = False,
    verify: bool = False,
    record_cached: bool = False,
    argv: list[str] | None = None,
):
    """Plan, validate, then run with the live view. The CLI and the tests both go through here.

    ``capture``: point this process's stdout/stderr at the run's driver.log while it runs (the
    CLI does; an in-process caller such as a test keeps its own streams).
    ``record_cached``: open an MLflow run even when every stage is cached. By default a run with
    nothing to compute records nothing (MLflow alone costs a second to import, and the run would
    copy what the runs that computed the outputs already hold); its summary names those runs.
    A sweep sets it: each cell must be a run to be compared.
    ``argv``: the command line to remember this resolution under (``pipelines.memo``).
    """
    from pipelines.console import NORMAL, LiveView
    from pipelines.logs import DRIVER_LOG, RunLogs, redirect_fds
    from pipelines.planning import RUN, log_dir_for, run_cached
    from pipelines.runner import StageFailed, default_run_name, init_ray
    from pipelines.tracking import make_tracker

    verbosity = NORMAL if verbosity is None else verbosity
    engine = make_engine(pipeline, loaded)
    try:
        selected, forced = engine.selection(only, from_, until, force)
        plan = engine.plan_selected(selected, forced, verify=verify)
        if not dry_run:  # a dry run collects every problem instead of stopping at the first
            engine.validate_stages(plan)
    except (GraphError, ConfigError, ValueError) as e:
        _fail(str(e))
    if dry_run:
        return _dry_run(engine, plan, loaded, address)
    if argv is not None and not record_cached:
        remember(argv, engine, loaded, dict(
            command="run", verbosity=verbosity, name=name, preset=loaded.typed.preset, capture=capture),
            selected, forced, verify)
    if not record_cached and not any(it.action == RUN for it in plan):
        return run_cached(plan, loaded.run_root, verbosity, name, loaded.typed.preset, capture)
    if verbosity > NORMAL:
        print_plan(plan)
    name = name or default_run_name(loaded.typed.preset)
    log_dir = log_dir_for(loaded.run_root, name)
    todo = [it.name for it in plan if it.action != "skip"]
    with contextlib.ExitStack() as stack:
        term = sys.stderr
        if capture:
            fd = stack.enter_context(redirect_fds(log_dir / DRIVER_LOG))
            term = stack.enter_context(os.fdopen(os.dup(fd), "w", buffering=1))
        logs = stack.enter_context(RunLogs(log_dir))
        view = LiveView(todo, file=term, verbosity=verbosity)
        view.log_dir = log_dir
        view.on_stage_state = lambda s, running: (logs.router.stage_started if running else logs.router.stage_ended)(s)
        tracker = make_tracker(loaded) if record_cached or any(it.action == "run" for it in plan) else None

        def start_ray() -> str:
            return init_ray(loaded.typed.ray, address=address)

        ok, summary, run_id = False, None, None
        try:
            with view:
                summary = engine.run(plan, tracker=tracker, run_name=name, on_event=view, log_dir=log_dir, start_ray=start_ray)
            ok, run_id = True, summary.parent_run_id
        except StageFailed as e:
            run_id = e.parent_run_id
            view.summary(run_id, loaded.run_root, log_dir, ok=False)
            view.print("finished stages are kept; rerun the same command to continue from them")
            raise typer.Exit(1)
        except Exception as e:  # noqa: BLE001 - e.g. Ray failing to start: say where the details are
            logging.getLogger("pipelines.commands").exception("run failed")
            view.error(f"{type(e).__name__}: {e}\n  details: {log_dir / DRIVER_LOG}")
            raise typer.Exit(1)
        except KeyboardInterrupt:
            view.print(("interrupted", "red"), ": running stages left no manifest; rerun to continue")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)  # stage threads may sit inside Ray calls; do not wait for them
        view.summary(run_id, loaded.run_root, log_dir, ok=ok, produced_by=summary.produced_by if summary else None)
    return summary


def remember(argv: list[str], engine, loaded: LoadedConfig, options: dict, selected, forced, verify: bool) -> None:
    """Remember this resolution for the next identical command (``pipelines.memo``), unless a
    stage's cache key fingerprints external files (only stage code can recompute those)."""
    if any(engine.external.values()):
        return
    stored = memo.payload(engine.graph_facts(), loaded.run_root, selected, forced, verify, **options)
    memo.remember(argv, stored, files=[s for s in loaded.sources if Path(s).is_file()], env=memo.ENV)


def _dry_run(engine, plan, loaded: LoadedConfig, address):
    from pipelines.resources import dry_run as check
    from pipelines.runner import init_ray

    print_plan(plan)
    report = check(engine, plan, loaded, lambda: init_ray(loaded.typed.ray, address=address))
    table = Table(title="resources per stage (peak, at once)")
    for col in ("stage", "action", "needs"):
        table.add_column(col)
    for row in report.rows:
        table.add_row(*row)
    console.print(table)
    if report.training:
        from pipelines.resources import TRAIN_COLUMNS

        ttable = Table(title="training stages (per optimizer step; memory per GPU, estimated)")
        for col in TRAIN_COLUMNS:
            ttable.add_column(col)
        for est in report.training:
            ttable.add_row(*est.row())
        console.print(ttable)
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


@app.command()
def run(
    overrides: Optional[List[str]] = OVERRIDES,
    preset: str = PRESET,
    config: Optional[Path] = EXPERIMENT,
    only: List[str] = ONLY,
    from_: Optional[str] = FROM,
    until: Optional[str] = UNTIL,
    force: List[str] = FORCE,
    run_root: Optional[Path] = RUN_ROOT_OPT,
    verbose: bool = VERBOSE,
    quiet: bool = QUIET,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    name: Optional[str] = typer.Option(None, "--name", help="MLflow parent run name"),
    dry_run: bool = typer.Option(False, "--dry-run", help="validate config, paths and cluster resources; print the plan; run nothing"),
    verify: bool = typer.Option(False, "--verify", help="check cached outputs against their sha256 first (not just sizes); damaged ones are recomputed"),
    pipeline: str = PIPELINE,
) -> None:
    """Run the pipeline (cached stages are skipped; Ray starts only if a stage must run)."""
    if verbose and quiet:
        _fail("--verbose and --quiet contradict each other; pick one")
    p, loaded = load(pipeline, preset, _with_run_root(overrides, run_root), config)
    verbosity = 2 if verbose else 0 if quiet else 1
    execute(p, loaded, only=only, from_=from_, until=until, force=force, address=address, name=name,
            dry_run=dry_run, verbosity=verbosity, capture=True, verify=verify, argv=memo.ARGV)


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
    only: List[str] = ONLY,
    from_: Optional[str] = FROM,
    until: Optional[str] = UNTIL,
    force: List[str] = FORCE,
    run_root: Optional[Path] = RUN_ROOT_OPT,
    as_json: bool = typer.Option(False, "--json", help="machine-readable plan on stdout"),
    pipeline: str = PIPELINE,
) -> None:
    """Show the DAG in order with each stage's cache key and whether it would run."""
    p, loaded = load(pipeline, preset, _with_run_root(overrides, run_root), config)
    engine = make_engine(p, loaded)
    try:
        selected, forced = engine.selection(only, from_, until, force)
        items = engine.plan_selected(selected, forced)
    except (GraphError, ValueError) as e:
        _fail(str(e))
    from pipelines.console import print_plan as show

    if memo.ARGV is not None:
        remember(memo.ARGV, engine, loaded, dict(command="plan", as_json=as_json), selected, forced, False)
    show(items, as_json=as_json)


@app.command()
def stages(pipeline: str = PIPELINE) -> None:
    """List every stage: version, inputs, outputs, config fields with defaults."""
    from metamorph.fields import operational_paths
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
        ops = operational_paths(cfg)
        for f in dataclasses.fields(cfg):
            val = json.dumps(to_plain(getattr(cfg, f.name)), default=str)
            if len(val) > 100:
                val = val[:97] + "..."
            op = " (operational)" if f.name in ops else ""
            out.print(f"    {f.name}: {val}{op}")


@app.command()
def sweep(
    file: Path = typer.Argument(..., help="a sweep YAML (conf/experiments/...) with a `sweep:` block"),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value applied to every cell"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="overrides the sweep file's preset"),
    run_root: Optional[Path] = RUN_ROOT_OPT,
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)"),
    pipeline: str = PIPELINE,
) -> None:
    """Run a grid of pipeline variants (one MLflow parent run per cell, shared cache)."""
    from pipelines.definitions import PIPELINES
    from pipelines.sweep import run_sweep

    if pipeline not in PIPELINES:
        _fail(f"unknown pipeline {pipeline!r}")
    try:
        # capture: each cell's Ray and library output goes to its driver.log, as `run`'s does
        out = run_sweep(PIPELINES[pipeline], file, execute_fn=functools.partial(execute, capture=True), preset=preset,
                        overrides=_with_run_root(overrides, run_root), address=address, say=console.print)
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
    port: int = typer.Option(5000, "--port", help="port of the UI (http://HOST:PORT)"),
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


@app.command("make-checkpoints")
def make_checkpoints(
    out: Path = typer.Argument(..., help="dir to write llm/, siglip/ and sd/ into"),
    seed: int = typer.Option(0, "--seed", help="weight init seed"),
) -> None:
    """Small random-weight checkpoints in the real HF formats, for `--preset rehearsal`."""
    from metamorph.checkpoints import make_checkpoints as make

    for name, path in make(out, seed).items():
        console.print(f"{name}: {path}")
    console.print(f"next: metamorph run --preset rehearsal shared.models={out}")
