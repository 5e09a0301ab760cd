"""`train_judge`: train the toy-world attribute judge that `evaluate` scores generated images with.

    metamorph run --preset tiny --only train_judge

Input ``mixture`` (only its held-out generation samples' scene meta, for the render geometry:
image size and object extents). Output ``judge/``: ``judge.safetensors`` + ``judge.json`` (width,
geometry, its own test's accuracy per attribute, the config), read by ``Judge.load``. The judge
trains on **fresh** renders from ``metamorph.world`` and is tested on more of them
(``metamorph/eval/judge.py``); ``judge_acc_*`` / ``judge_ok`` are this stage's metrics, and
evaluate counts judged generation scores only when ``judge_ok`` (every attribute at or above
``threshold``). A mixture whose held-out generation samples carry no toy-world scene meta (a real
dataset) gets a ``judge.json`` saying so, and evaluate reports the judged scores as skipped.

Its own stage, not a step of evaluate: it needs nothing but the mixture, so the DAG trains it while
the vision encoder pretrains (tiny: ~25 s of one core that sat idle), evaluate reruns reuse it,
and its accuracy is visible in the MLflow child run before any model is scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metamorph.eval.config import JudgeConfig
from pipelines.stage import Stage, StageConfig, StageContext, operational

_LOGGER = "metamorph.eval.judge"
# held-out generation samples read for the geometry (medians; the toy world renders every scene
# at one size, so a few hundred settle them)
GEOMETRY_SAMPLES = 512


@dataclass(kw_only=True)
class TrainJudgeConfig(StageConfig, JudgeConfig):
    """The judge's recipe (``metamorph.eval.config.JudgeConfig``) plus where it runs."""

    # CPUs the training task reserves, also its torch thread count (the judge is deterministic in
    # its config and thread count, so its figures do not depend on where it runs)
    cpus: float = field(default=1.0, metadata=operational())
    # CPU priority of the training task (0: normal; up to 19). Nothing but evaluate waits for the
    # judge, so by default it yields the cores: in tiny it starts while vision_encoder pretrains
    # and was still training when tokenize and train_decoder started, three busy processes on two
    # cores (tokenize 20 -> 25-27 s, on the critical path). The figures do not depend on it.
    nice: int = field(default=10, metadata=operational())

    def __post_init__(self) -> None:
        JudgeConfig.__post_init__(self)
        if not 0 <= self.nice <= 19:
            raise ValueError(f"train_judge.nice={self.nice} must be in 0..19 (0: normal priority)")
        if self.cpus < 1:
            raise ValueError(f"train_judge.cpus={self.cpus} must be >= 1 (it is also the torch thread count)")

    def recipe(self, seed: int) -> JudgeConfig:
        """The plain judge config, its seed combined with the pipeline's."""
        fields = {f: getattr(self, f) for f in JudgeConfig.__dataclass_fields__}
        return JudgeConfig(**{**fields, "seed": self.seed + seed * 1_000_003})


class TrainJudgeStage(Stage):
    name = "train_judge"
    version = "1"
    inputs = ("mixture",)
    outputs = ("judge",)
    config_cls = TrainJudgeConfig
    description = "attribute judge for generated toy-world images (CNN on fresh renders; its own test gates evaluate)"

    def resources(self, cfg: TrainJudgeConfig) -> dict[str, float]:
        return {"CPU": cfg.cpus}

    def run(self, ctx: StageContext) -> dict[str, float]:
        import logging

        from metamorph.eval.judge import Judge, infer_geometry
        from stages._training import ray_is_up, start_task

        cfg: TrainJudgeConfig = ctx.cfg
        out = ctx.output("judge")
        metas = heldout_scene_metas(ctx.input("mixture"), GEOMETRY_SAMPLES)
        if not metas:
            reason = "no held-out t2i / image_edit sample carries toy-world scene meta"
            logging.getLogger(_LOGGER).info("judge skipped: %s", reason)
            Judge.save_skipped(out, reason)
            return {"judge_skipped": 1.0}
        recipe = cfg.recipe(ctx.seed)
        geometry = infer_geometry(recipe, metas)
        if ray_is_up():  # a Ray task holding its CPUs, beside the vision encoder's pretraining
            judge, stats = start_task(train_judge, recipe, geometry, int(cfg.cpus), cpus=cfg.cpus, logger=_LOGGER,
                                      nice=cfg.nice)()
        else:
            judge, stats = train_judge(recipe, geometry, int(cfg.cpus))
        judge.save(out, stats, recipe)
        ctx.log_metrics(stats)
        ctx.tracking.set_tags({f"judge.{k}": v for k, v in geometry.items()})
        logging.getLogger(_LOGGER).info(
            "judge: min accuracy %.3f (threshold %s), ok=%s", stats["judge_acc_min"], cfg.threshold, bool(stats["judge_ok"]))
        return {**stats, **{f"geometry/{k}": float(v) for k, v in geometry.items()}}


def train_judge(recipe: JudgeConfig, geometry: dict, threads: int) -> tuple[Any, dict[str, float]]:
    """Train and test the judge on ``threads`` torch threads (the Ray task's body)."""
    import logging

    from metamorph.eval.judge import Judge
    from metamorph.threads import torch_threads

    with torch_threads(threads):
        return Judge.train(recipe, geometry, log=logging.getLogger(_LOGGER).info)


def heldout_scene_metas(mixture: Any, limit: int) -> list[Any]:
    """The metas of up to ``limit`` held-out t2i / image_edit samples that hold toy-world scenes."""
    from metamorph.data.shards import iter_samples
    from metamorph.eval.heldout import heldout_dir
    from metamorph.eval.judge import iter_scene_metas

    path, split = heldout_dir(mixture)
    metas = []
    for sample, _ in iter_samples(path, split):
        if sample.task in ("t2i", "image_edit") and next(iter_scene_metas(sample.meta), None) is not None:
            metas.append(sample.meta)
            if len(metas) >= limit:
                break
    return metas
