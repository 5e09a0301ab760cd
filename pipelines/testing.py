"""Run one stage in-process without the engine, for unit and stage tests.

    from pipelines.testing import run_stage
    out_dir, stats = run_stage(MyStage(), MyStage.config_cls(), inputs={"world": p}, root=tmp_path)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from pipelines.stage import Stage, StageContext


def run_stage(
    stage: Stage,
    cfg: Any,
    inputs: dict[str, Path] | None = None,
    root: Path | str = "runs",
    seed: int = 0,
    key: str = "test",
) -> tuple[Path, dict[str, float]]:
    """Run ``stage`` with ``cfg``; return (promoted output dir, stats). No Ray init, no MLflow."""
    root = Path(root)
    work = root / stage.name / f"{key}.tmp"
    final = root / stage.name / key
    for p in (work, final):
        if p.exists():
            shutil.rmtree(p)
    work.mkdir(parents=True)
    ctx = StageContext(
        stage=stage.name,
        key=key,
        cfg=cfg,
        seed=seed,
        inputs={k: Path(v) for k, v in (inputs or {}).items()},
        work_dir=work,
        checkpoint_dir=root / stage.name / f"{key}.ckpt",
        run_root=root,
    )
    stats = stage.run(ctx) or {}
    work.rename(final)
    return final, stats
