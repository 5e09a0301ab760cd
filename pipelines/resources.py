"""Resource checks for `metamorph run --dry-run`: does the connected cluster fit every stage?

    metamorph run --preset cluster --dry-run --address auto
"""

from __future__ import annotations


def check_resources(engine, plan) -> list[str]:
    """Problems (empty if none): a stage asking for more of a resource than the cluster has."""
    import ray

    total = ray.cluster_resources()
    problems = []
    for it in plan:
        if it.action != "run":
            continue
        need = engine.dag.stages[it.name].resources(engine.stage_cfgs[it.name])
        for res, amount in need.items():
            have = total.get(res, 0.0)
            if amount > have:
                problems.append(f"stage {it.name!r} needs {amount:g} {res}, the cluster has {have:g}")
    return problems
