"""The DAG: edges from artifact names, order from graphlib, selection for --only/--from/--until.

    metamorph plan --preset smoke

Errors (duplicate stage, two producers of one artifact, an input nobody produces, a cycle) are
raised as ``GraphError`` when the pipeline is loaded, before anything runs.
"""

from __future__ import annotations

import graphlib
from dataclasses import dataclass
from typing import Any, Iterable

from pipelines.planning import GraphError  # noqa: F401  (raised here, defined with the planner)
from pipelines.stage import Stage




@dataclass
class Pipeline:
    """A named set of stages; ``targets`` are the stages the run exists for (default: every sink).

    Stages that no target needs (e.g. the toy world when every source points at real data)
    are left out of the DAG.
    """

    name: str
    stages: list[Stage]
    targets: tuple[str, ...] | None = None

    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]


@dataclass
class Dag:
    stages: dict[str, Stage]  # name -> stage, only those the targets need
    inputs: dict[str, tuple[str, ...]]  # name -> input artifacts under the config
    producer: dict[str, str]  # artifact -> producing stage
    order: list[str]  # topological, deterministic

    def upstream(self, name: str) -> list[str]:
        return sorted({self.producer[a] for a in self.inputs[name]})

    def downstream(self, name: str) -> list[str]:
        return sorted(s for s in self.stages if name in self.upstream(s))

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.upstream(name))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(self.upstream(s))
        return seen

    def descendants(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.downstream(name))
        while todo:
            s = todo.pop()
            if s not in seen:
                seen.add(s)
                todo.extend(self.downstream(s))
        return seen


def build_dag(pipeline: Pipeline, stage_cfgs: dict[str, Any]) -> Dag:
    names = [s.name for s in pipeline.stages]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise GraphError(f"pipeline {pipeline.name!r} defines stage(s) twice: {dupes}")
    by_name = {s.name: s for s in pipeline.stages}
    producer: dict[str, str] = {}
    for s in pipeline.stages:
        for a in s.outputs:
            if a in producer:
                raise GraphError(
                    f"artifact {a!r} is produced by both {producer[a]!r} and {s.name!r}; "
                    "each artifact needs exactly one producer"
                )
            producer[a] = s.name
    inputs = {s.name: tuple(s.input_artifacts(stage_cfgs[s.name])) for s in pipeline.stages}
    for name, arts in inputs.items():
        for a in arts:
            if a not in producer:
                raise GraphError(
                    f"stage {name!r} needs artifact {a!r} but no stage produces it "
                    f"(produced: {sorted(producer)})"
                )
    ts = graphlib.TopologicalSorter()
    for name in names:  # definition order keeps the sort deterministic and readable
        ts.add(name, *sorted({producer[a] for a in inputs[name]}))
    try:
        order = list(ts.static_order())
    except graphlib.CycleError as e:
        cycle = " -> ".join(e.args[1])
        raise GraphError(f"the stages form a cycle: {cycle}") from None
    # Keep only what the targets need.
    targets = pipeline.targets
    if targets is None:
        consumed = {producer[a] for arts in inputs.values() for a in arts}
        targets = tuple(n for n in names if n not in consumed)
    unknown = [t for t in targets if t not in by_name]
    if unknown:
        raise GraphError(f"pipeline targets name unknown stages: {unknown}")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        n = todo.pop()
        if n not in needed:
            needed.add(n)
            todo.extend(producer[a] for a in inputs[n])
    order = [n for n in order if n in needed]
    return Dag(
        stages={n: by_name[n] for n in order},
        inputs={n: inputs[n] for n in order},
        producer={a: p for a, p in producer.items() if p in needed},
        order=order,
    )


def select(
    dag: Dag,
    only: Iterable[str] = (),
    from_: str | None = None,
    until: str | None = None,
) -> set[str]:
    """The stages a run should consider executing. Unselected upstream stages must be cached."""
    only = list(only)
    for n in [*only, *(x for x in (from_, until) if x)]:
        if n not in dag.stages:
            raise GraphError(f"unknown stage {n!r}; stages in this pipeline: {dag.order}")
    selected = set(dag.order)
    if from_:
        selected &= {from_} | dag.descendants(from_)
    if until:
        selected &= {until} | dag.ancestors(until)
    if only:
        selected &= set(only)
    return selected
