"""`evaluate`: score the VPiT model and the decoder on held-out data and benchmark files; write
the run report.

    metamorph run --preset tiny --only evaluate      # after the rest of the DAG is cached

Inputs: ``vpit_model`` (weights + tokenizer), ``decoder``, ``vision_encoder``, ``tokenizer``,
``mixture`` (its ``heldout/`` samples), ``judge`` (the ``train_judge`` stage's attribute judge).
Output ``eval_report/``:

* ``metrics.json``: every metric (also logged to this stage's MLflow child run); the headline
  ones (``eval/...``) are logged to the pipeline's parent run too, so runs line up in the MLflow
  runs table and compare view.
* ``samples.jsonl``: one record per evaluated item (question/answer/truth, or prompt/cosine/
  judged attributes per CFG scale, or benchmark row).
* ``report.html``: metric tables and sample grids with inline images (logged as an artifact).

Steps (``metamorph.eval.run.evaluate_all``; this module is the Ray and MLflow glue): held-out QA
(exact match per task/attribute vs the majority baseline); generation (t2i, image edit, frame
prediction) at each visual-token CFG scale, judged by the attribute judge (its own test's accuracy
gates the judged scores: ``judge_ok``); on CPU the QA pass runs as a Ray task beside the generations
(``qa_beside_generation``); VLMEvalKit TSV benchmarks; FID / CLIP score when weights are given. With
``use_gpu`` the whole evaluation runs as one Ray task holding a GPU (the driver may have none).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from metamorph.eval.run import GALLERY_FILE, EvalConfig, evaluate_all
from pipelines.stage import Stage, StageConfig, StageContext, operational

_EVAL_LOGGER = "metamorph.eval.run"  # evaluate_all's log, where the QA task's lines belong


@dataclass(kw_only=True)
class EvaluateConfig(StageConfig, EvalConfig):
    """The evaluation's own fields (``metamorph.eval.run.EvalConfig``) plus where it runs."""

    # --- operational
    # Register the evaluated VPiT model (its MLflow logged model) under this name in the MLflow
    # model registry, with the headline metrics as the version's tags and description. None: don't.
    register_as: Optional[str] = field(default=None, metadata=operational())
    use_gpu: bool = field(default=False, metadata=operational())  # run the evaluation as a Ray task with one GPU
    # CPUs that task reserves; on CPU also evaluate's torch thread count, pinned so a run's
    # figures do not depend on where the driver runs (a `ray job submit` entrypoint and a
    # terminal start torch with different thread counts, and float sums follow them)
    cpus: float = field(default=1.0, metadata=operational())
    # On CPU, run the QA pass as a Ray task holding cpus CPUs (as many torch threads as this
    # process) while the generations, their decoding and judging run here (this process has the
    # libraries imported and the decoder loaded, the task starts cold: ~5 s, so it takes the
    # shorter half). Both halves are deterministic, so every figure is the same either way; tiny's
    # evaluate 52 s -> ~32 s. False (or Ray not started, as when the stage runs on its own): one
    # after the other here (the only way with use_gpu).
    qa_beside_generation: bool = field(default=True, metadata=operational())

    def __post_init__(self) -> None:
        EvalConfig.__post_init__(self)
        if self.cpus <= 0:
            raise ValueError(f"evaluate.cpus={self.cpus} must be > 0")

    def library(self) -> EvalConfig:
        """The plain evaluation config (what the Ray task and ``evaluate_all`` take)."""
        return EvalConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalConfig)})


class EvaluateStage(Stage):
    name = "evaluate"
    # 2: visual thinking also answered after the true crop (qa_acc_true_crop); 3: the judge is an input
    version = "3"
    inputs = ("vpit_model", "decoder", "vision_encoder", "tokenizer", "mixture", "judge")
    outputs = ("eval_report",)
    config_cls = EvaluateConfig
    description = "held-out QA + generation (judged), TSV benchmarks, FID/CLIP; report.html"

    def fingerprint(self, cfg: EvaluateConfig) -> dict[str, Any]:
        from pipelines.cache import file_fingerprint

        paths = list(cfg.tsv_paths) + [p for p in (cfg.fid.inception_path, cfg.fid.clip_path) if p]
        return {p: file_fingerprint(p) for p in paths}

    def validate(self, cfg: EvaluateConfig) -> None:
        for p in cfg.tsv_paths:
            if not Path(p).is_file():
                raise ValueError(f"evaluate.tsv_paths: {p} is not a file")

    def resources(self, cfg: EvaluateConfig) -> dict[str, float]:
        # on CPU the generations run in the driver; the Ray CPUs are the QA task's
        return {"CPU": cfg.cpus, **({"GPU": 1.0} if cfg.use_gpu else {})}

    def run(self, ctx: StageContext) -> dict[str, float]:
        cfg: EvaluateConfig = ctx.cfg
        out = ctx.output("eval_report")
        paths = {a: str(ctx.input(a).resolve()) for a in self.inputs}
        if cfg.use_gpu:
            import ray

            task = ray.remote(num_gpus=1, num_cpus=cfg.cpus)(evaluate_all)
            metrics, headline, params = ray.get(task.remote(paths, cfg.library(), str(out), ctx.seed, "cuda"))
        else:
            from metamorph.threads import torch_threads
            from stages._training import ray_is_up

            starter = _qa_task(cfg.cpus) if cfg.qa_beside_generation and ray_is_up() else None
            with torch_threads(int(cfg.cpus)):
                metrics, headline, params = evaluate_all(paths, cfg.library(), str(out), ctx.seed, "cpu", start_qa=starter)
        return publish(ctx, out, metrics, headline, params)


def _answer(paths: dict, cfg: Any, samples: list, threads: int) -> Any:
    """The QA task's body: the QA pass on ``threads`` torch threads."""
    from metamorph.eval.run import answer_questions
    from metamorph.threads import torch_threads

    with torch_threads(threads):
        return answer_questions(paths, cfg, samples, "cpu", log=logging.getLogger(_EVAL_LOGGER).info)


def _qa_task(cpus: float):
    """A ``QAStarter`` that runs the QA pass as a Ray task holding ``cpus`` CPUs."""
    from stages._training import start_task

    return lambda paths, cfg, samples: start_task(_answer, paths, cfg, samples, int(cpus), cpus=cpus, logger=_EVAL_LOGGER)


def publish(ctx: StageContext, out: Path, metrics: dict[str, float], headline: dict[str, float],
            params: Optional[dict[str, Any]] = None) -> dict[str, float]:
    """Log metrics to the stage's child run, the headline to the pipeline's parent run, the
    evaluation protocol (FID settings, judge geometry, skip reasons) as ``eval.*`` tags of the
    child run (its params are the stage config, set by the engine), the report files as
    artifacts; return the manifest stats."""
    ctx.record_rows("eval_report/samples.jsonl", int(metrics.get("n_records", 0)))
    ctx.log_metrics(metrics)
    ctx.parent_tracking.log_metrics(headline)
    if params:
        ctx.tracking.set_tags({f"eval.{k}": v for k, v in params.items()})
    for name in ("report.html", "metrics.json", "samples.jsonl"):
        if (out / name).exists():
            ctx.log_artifact(out / name)
    if ctx.tracking.run_id:
        _log_tables(ctx, out, judge_ok=bool(metrics.get("judge_ok")))
        _link_models(ctx, metrics, headline)
    # The manifest keeps the headline (same ``eval/`` names as on the parent run, so a cached
    # rerun can copy them there) and the judge gate; the full set is in metrics.json.
    return dict(headline) | {"judge_ok": metrics.get("judge_ok", 0.0), "seconds": metrics.get("seconds", 0.0)}


def _link_models(ctx: StageContext, metrics: dict[str, float], headline: dict[str, float]) -> None:
    """Tie the metrics to the MLflow logged models they measure: the headline to the VPiT model,
    the decoder-only reconstruction scores to the decoder; register the VPiT model if asked."""
    from pipelines.tracking import dataset_entity, find_logged_model, log_model_metrics, register_model

    mixture, vpit_dir, dec_dir = (ctx.inputs.get(a) for a in ("mixture", "vpit_model", "decoder"))
    heldout = dataset_entity("mixture", mixture) if mixture is not None else None
    vpit_key = vpit_dir.resolve().parent.name if vpit_dir is not None else None
    vpit_id = find_logged_model(ctx.tracking, "vpit_model", vpit_key) if vpit_key else None
    if vpit_id:
        log_model_metrics(ctx.tracking, vpit_id, headline, dataset=heldout)
    dec_id = find_logged_model(ctx.tracking, "decoder", dec_dir.resolve().parent.name) if dec_dir is not None else None
    if dec_id:
        recon = {k: v for k, v in metrics.items() if "/recon/" in k}
        log_model_metrics(ctx.tracking, dec_id, recon, dataset=heldout)
    cfg: EvaluateConfig = ctx.cfg
    if cfg.register_as:
        if not vpit_id:
            raise RuntimeError(f"evaluate.register_as={cfg.register_as!r}: no MLflow logged model for train_vpit "
                               f"key {vpit_key} in this tracking store (was train_vpit run with tracking off?)")
        version = register_model(ctx.tracking, vpit_id, cfg.register_as, headline,
                                 description=f"VPiT model of train_vpit {vpit_key}, evaluated by run {ctx.tracking.run_id}")
        ctx.tracking.set_tags({"registered_model": f"{cfg.register_as}/{version}"})


def _log_tables(ctx: StageContext, out: Path, judge_ok: bool) -> None:
    """Per-sample results as MLflow tables at the run's artifact root (``mlflow.load_table`` and the
    UI's table view read them there): held-out QA
    (question, answer, prediction, correct) and generation (caption, generated image, judged)."""
    client = ctx.tracking._client()
    qa: dict[str, list] = {k: [] for k in ("task", "attribute", "question", "answer", "prediction", "correct")}
    if (out / "samples.jsonl").exists():
        with open(out / "samples.jsonl", encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                if r.get("kind") != "qa":
                    continue
                for k, v in (("task", r.get("task")), ("attribute", r.get("attribute")), ("question", r.get("question")),
                             ("answer", r.get("truth")), ("prediction", r.get("prediction")), ("correct", bool(r.get("correct")))):
                    qa[k].append(v)
    if qa["task"]:
        client.log_table(ctx.tracking.run_id, data=qa, artifact_file="eval_qa_table.json")
    gen_file = out / GALLERY_FILE
    if gen_file.exists():
        from PIL import Image

        cols: dict[str, list] = {k: [] for k in ("task", "caption", "cfg_scale", "generated", "reference", "judged", "all_right")}
        with open(gen_file, encoding="utf-8") as f:
            for line in f:
                r = json.loads(line)
                with Image.open(out / r["generated"]) as g, Image.open(out / r["reference"]) as ref:
                    cols["generated"].append(g.convert("RGB"))
                    cols["reference"].append(ref.convert("RGB"))
                cols["task"].append(r["task"])
                cols["caption"].append(r["caption"])
                cols["cfg_scale"].append(r["cfg_scale"])
                # as in the report: a judge that failed its own accuracy test gives no verdicts
                scores = (r.get("scores") or {}) if judge_ok else {}
                cols["judged"].append(", ".join(f"{k}={v:g}" for k, v in scores.items() if k != "all")
                                      if judge_ok else "withheld: the judge failed its own test")
                cols["all_right"].append(bool(scores.get("all") == 1.0) if scores else None)
        if cols["task"]:
            client.log_table(ctx.tracking.run_id, data=cols, artifact_file="eval_generation_table.json")
