"""Small real stages for the engine tests: a source, a Ray Data map, a join, one that can fail.

They do real (tiny) work on real Ray and write real files, so the engine is tested end to end.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.graph import Pipeline
from pipelines.stage import Stage, StageConfig, operational


@dataclass(kw_only=True)
class NumbersConfig(StageConfig):
    n: int = 20  # how many numbers to write
    workers: int = field(default=1, metadata=operational())  # does not change the output

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"stages.numbers.n must be >= 1, got {self.n}")


class Numbers(Stage):
    """Writes 0..n-1, one per line."""

    name = "numbers"
    outputs = ("numbers",)
    config_cls = NumbersConfig

    def run(self, ctx):
        out = ctx.output("numbers") / "values.jsonl"
        with open(out, "w") as f:
            for i in range(ctx.cfg.n):
                f.write(json.dumps({"x": i}) + "\n")
        ctx.record_rows("numbers/values.jsonl", ctx.cfg.n)
        return {"rows": ctx.cfg.n}


@dataclass(kw_only=True)
class ScaleConfig(StageConfig):
    factor: int = 2
    fail: bool = False  # raise mid-stage (failure tests)
    hold_file: str = ""  # if set: write a marker, then wait until this file exists (kill tests)


class Scale(Stage):
    """Multiplies every number on Ray Data and writes Parquet."""

    name = "scale"
    inputs = ("numbers",)
    outputs = ("scaled",)
    config_cls = ScaleConfig

    def run(self, ctx):
        import ray

        src = ctx.input("numbers") / "values.jsonl"
        ds = ray.data.read_json(str(src)).map_batches(
            lambda b, f=ctx.cfg.factor: {"x": b["x"] * f}, batch_format="numpy"
        )
        rows = sorted(r["x"] for r in ds.take_all())
        out = ctx.output("scaled")
        (out / "partial.txt").write_text("half-written")
        if ctx.cfg.hold_file:
            Path(ctx.cfg.hold_file + ".started").write_text(str(os.getpid()))
            while not Path(ctx.cfg.hold_file).exists():
                time.sleep(0.1)
        if ctx.cfg.fail:
            raise RuntimeError("scale was told to fail")
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"x": rows}), out / "scaled.parquet")
        return {"rows": len(rows), "sum": sum(rows)}


@dataclass(kw_only=True)
class LettersConfig(StageConfig):
    text: str = "abc"


class Letters(Stage):
    """An independent branch (runs concurrently with scale)."""

    name = "letters"
    outputs = ("letters",)
    config_cls = LettersConfig

    def run(self, ctx):
        (ctx.output("letters") / "letters.txt").write_text(ctx.cfg.text)
        return {"chars": len(ctx.cfg.text)}


@dataclass(kw_only=True)
class ReportConfig(StageConfig):
    title: str = "report"


class Report(Stage):
    """Joins both branches."""

    name = "report"
    inputs = ("scaled", "letters")
    outputs = ("report",)
    config_cls = ReportConfig

    def run(self, ctx):
        import pyarrow.parquet as pq

        xs = pq.read_table(ctx.input("scaled") / "scaled.parquet")["x"].to_pylist()
        letters = (ctx.input("letters") / "letters.txt").read_text()
        (ctx.output("report") / "report.json").write_text(json.dumps({"title": ctx.cfg.title, "total": sum(xs), "letters": letters}))
        return {"total": sum(xs)}


def toy_pipeline() -> Pipeline:
    return Pipeline(name="toy", stages=[Numbers(), Scale(), Letters(), Report()])
