"""Run the whole evaluation of a VPiT model and its decoder, and write the report: the library
half of the ``evaluate`` stage (no Ray, no MLflow; ``stages/evaluate.py`` is the glue).

    python -c "from metamorph.eval.run import EvalConfig, evaluate_all; help(evaluate_all)"

``evaluate_all(paths, cfg, out_dir)`` scores held-out QA (exact match per task/attribute vs the
majority baseline), generation (t2i, image edit, frame prediction) at each visual-token CFG scale,
judged by the attribute judge in ``paths["judge"]`` (the ``train_judge`` stage's; its own test's
accuracy gates the judged generation scores: ``judge_ok``), VLMEvalKit TSV benchmarks and FID /
CLIP score when weights are given, and writes ``metrics.json``, ``samples.jsonl``, ``report.html``
and the generation gallery into ``out_dir``. The QA pass (``answer_questions``) can run elsewhere
while the generations run here (the evaluate stage: a Ray task). ``EvalConfig`` is a plain
dataclass: the stage config extends it with the Ray knobs.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from metamorph.eval.config import FIDConfig
from metamorph.fields import operational

QA_TASKS = ("image_qa", "video_qa", "visual_thinking")
GEN_TASKS = ("t2i", "image_edit", "frame_prediction")
HEADLINE_PREFIX = "eval/"


@dataclass(kw_only=True)
class EvalConfig:
    # Held-out items per task (a seeded uniform sample; 0 = every held-out sample). QA accuracy
    # has a binomial s.e. of ~3.5% at 200 items; generation is ~16x dearer per item (N visual
    # steps + decoder), so fewer.
    n_image_qa: int = 200
    n_video_qa: int = 100
    n_visual_thinking: int = 100
    n_t2i: int = 64
    n_image_edit: int = 32
    n_frame_prediction: int = 32
    # Ask each held-out toy-world image every question type (image QA 5, video QA 3, visual
    # thinking 2), not only its record's own: k x the items per attribute from the same held-out
    # images (metamorph/eval/understanding.py every_question_items)
    every_question: bool = False
    # text-to-image retrieval among blocks of this many held-out items (0 = all of them): 64 keeps
    # "top-1 of 64" (chance 1/64) while n_t2i > 64 narrows its interval
    retrieval_pool: int = 0
    max_new_tokens: int = 16  # answer length cap (toy answers are 1-3 tokens; MC letters 1)
    # QA majority baseline from the training answers: at most this many training QA items are
    # read (0 = all; the shards holding them are streamed, images are not decoded)
    prior_max_items: int = 200_000
    # Visual-token CFG scales (1.0 = off, the paper's setting); the first is the headline. Each
    # extra scale repeats generation and decoding.
    cfg_scales: list[float] = field(default_factory=lambda: [1.0, 2.0])
    # Decoder sampling; None = the settings the decoder was exported with.
    decoder_guidance: Optional[float] = None
    decoder_steps: Optional[int] = None
    recon: bool = True  # also decode the true tokens (decoder-only upper bound)
    # VLMEvalKit TSV files (MMBench / SEED / ScienceQA exports), scored by option-letter likelihood.
    tsv_paths: list[str] = field(default_factory=list)
    tsv_limit: int = 0  # rows per file (0 = all)
    fid: FIDConfig = field(default_factory=FIDConfig)
    report_samples: int = field(default=12, metadata=operational())  # rows per sample grid in the report
    seed: int = 0  # held-out sampling and decoder noise (combined with the pipeline seed)

    def __post_init__(self) -> None:
        for k in ("n_image_qa", "n_video_qa", "n_visual_thinking", "n_t2i", "n_image_edit", "n_frame_prediction"):
            if getattr(self, k) < 0:
                raise ValueError(f"evaluate.{k}={getattr(self, k)} must be >= 0 (0 = all held-out samples)")
        if self.prior_max_items < 0:
            raise ValueError(f"evaluate.prior_max_items={self.prior_max_items} must be >= 0 (0 = every training item)")
        if self.max_new_tokens < 1:
            raise ValueError(f"evaluate.max_new_tokens={self.max_new_tokens} must be >= 1")
        if not self.cfg_scales or any(s < 0 for s in self.cfg_scales):
            raise ValueError(f"evaluate.cfg_scales={self.cfg_scales}: need a non-empty list of scales >= 0 (1 = off)")
        if self.decoder_guidance is not None and self.decoder_guidance < 0:
            raise ValueError("evaluate.decoder_guidance must be >= 0 or null")
        if self.decoder_steps is not None and self.decoder_steps < 1:
            raise ValueError("evaluate.decoder_steps must be >= 1 or null")
        if self.tsv_limit < 0 or self.report_samples < 0:
            raise ValueError("evaluate.tsv_limit and .report_samples must be >= 0")

    def caps(self) -> dict[str, int]:
        return {t: getattr(self, f"n_{t}") for t in (*QA_TASKS, "t2i", "image_edit", "frame_prediction")}


GALLERY_FILE = "gallery.jsonl"


def write_gallery(out: Path, gallery: dict[str, list]) -> None:
    """The report's generation samples as PNGs + ``gallery.jsonl`` (for the MLflow table)."""
    rows = []
    img_dir = out / "gallery"
    for task, entries in gallery.items():
        for i, e in enumerate(entries):
            if not e.get("generated"):
                continue
            img_dir.mkdir(exist_ok=True)
            ref = f"gallery/{task}-{i}-reference.png"
            e["reference"].save(out / ref)
            for scale, img in e["generated"].items():
                gen = f"gallery/{task}-{i}-cfg{scale}.png"
                img.save(out / gen)
                rows.append({"task": task, "id": e["id"], "caption": e["text"], "cfg_scale": float(scale),
                             "generated": gen, "reference": ref, "scores": e["scores"].get(scale)})
    if rows:
        with open(out / GALLERY_FILE, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=_jsonable) + "\n")


def _log(msg: str) -> None:
    logging.getLogger("metamorph.eval.run").info(msg)


@dataclass
class GenerationResult:
    """What the generation half returns."""

    metrics: dict[str, float]  # evaluate_generation's keys, judged ones withheld when the judge failed
    records: list[dict[str, Any]]
    gallery: dict[str, list]
    collected: dict[str, dict[str, list]]  # every generated image, for FID / CLIP score (when asked)
    judge_stats: dict[str, float]  # judge_acc_* / judge_ok (judge_ok 0 when there is no judge)
    params: dict[str, Any]  # judge geometry, or why nothing was judged


@dataclass
class QAResult:
    """What the QA pass returns (picklable: it may come back from a Ray task)."""

    records: list[dict[str, Any]]  # one per asked item, in the order asked
    metrics: dict[str, float]  # accuracy per task / attribute, the majority baselines, intervals
    seconds: float


# How the QA pass runs: (paths, cfg, samples) -> a zero-argument callable returning its QAResult.
# Starting may return at once with the work under way elsewhere (the evaluate stage runs it as a
# Ray task while the generations run here).
QAStarter = Callable[[dict, "EvalConfig", list], Callable[[], QAResult]]


def question_items(cfg: EvalConfig, samples: list) -> list:
    """The QA items asked of held-out QA ``samples`` ((Sample, images) pairs), in order."""
    from metamorph.eval.understanding import every_question_items, qa_items

    ask = every_question_items if cfg.every_question else qa_items
    return [it for s, ims in samples for it in ask(s, ims)]


def answer_questions(paths: dict[str, str], cfg: EvalConfig, samples: list, device: str = "cpu",
                     log: Callable[[str], None] = _log, runner: Any = None) -> QAResult:
    """The QA pass: ask every question of the held-out QA ``samples`` and score the answers by
    exact match against the majority baseline of the training answers (the mixture's training
    QA items; no image is decoded). Deterministic in its inputs and thread count, wherever it runs."""
    from metamorph.eval.heldout import iter_train
    from metamorph.eval.inference import VPiTRunner
    from metamorph.eval.understanding import answer_prior, evaluate_qa, qa_items, summarise

    t = time.perf_counter()
    runner = runner or VPiTRunner.from_dirs(paths["vpit_model"], paths["tokenizer"], paths["vision_encoder"], None, device)
    qa = question_items(cfg, samples)
    records = evaluate_qa(runner, qa, cfg.max_new_tokens)
    prior, n_prior = {}, 0
    if qa:
        train_qa = ({"task": it.task, "attribute": it.attribute, "format": it.format, "truth": it.truth}
                    for s, ims in iter_train(paths["mixture"], QA_TASKS) for it in qa_items(s, ims))
        prior, n_prior = answer_prior(train_qa, cfg.prior_max_items)
    metrics = {"qa_prior_items": float(n_prior), **summarise(records, prior)}
    if records:
        vt = [r["crop_cosine"] for r in records if "crop_cosine" in r]
        if vt:
            metrics["qa_crop_cosine/visual_thinking"] = sum(vt) / len(vt)
        log(f"QA: {len(records)} items, acc {metrics['qa_acc']:.3f} vs majority {metrics['qa_majority']:.3f} "
            f"(training answers; held-out answers' own majority {metrics['qa_majority_heldout']:.3f}) "
            f"({time.perf_counter() - t:.1f}s)")
    return QAResult(records, metrics, time.perf_counter() - t)


def ask_here(device: str = "cpu", log: Callable[[str], None] = _log, runner: Any = None) -> QAStarter:
    """The default ``QAStarter``: run the QA pass in this process, when its result is asked for."""
    def start(paths, cfg, samples):
        return lambda: answer_questions(paths, cfg, samples, device, log, runner)

    return start


def generate_and_judge(paths: dict[str, str], cfg: EvalConfig, samples: list, seed: int, device: str = "cpu",
                       log: Callable[[str], None] = _log, runner: Any = None) -> GenerationResult:
    """The generation half of the evaluation: generate every held-out generation item (``samples``:
    (Sample, images) pairs of t2i / image_edit / frame_prediction) at each CFG scale, decode, and
    judge with the judge in ``paths["judge"]`` (none given: nothing is judged). Deterministic in
    its inputs and thread count, wherever it runs."""
    from metamorph.eval.generation import evaluate_generation, gen_items
    from metamorph.eval.inference import VPiTRunner
    from metamorph.eval.judge import Judge

    runner = runner or VPiTRunner.from_dirs(paths["vpit_model"], paths["tokenizer"], paths["vision_encoder"],
                                            paths["decoder"], device)
    items = [it for s, ims in samples for it in gen_items(s, ims)]
    judge, judge_stats, params = None, {"judge_ok": 0.0}, {}
    if not any(it.truth is not None for it in items):
        params["judge_skipped"] = "no held-out generation sample carries toy-world scene meta"
    elif not paths.get("judge"):
        params["judge_skipped"] = "no judge given (the train_judge stage's output)"
    else:
        judge, judge_stats = Judge.load(paths["judge"])
        if judge is None:
            params["judge_skipped"] = judge_stats.pop("skipped")
            judge_stats = {"judge_ok": 0.0}
        else:
            params.update({f"judge_{k}": v for k, v in judge.geometry.items()})
            log(f"judge: min accuracy {judge_stats['judge_acc_min']:.3f}, ok={bool(judge_stats['judge_ok'])}")
    collected: dict[str, dict[str, list]] = {}
    want_real = cfg.fid.inception_path is not None or cfg.fid.clip_path is not None
    gen_metrics, records, gallery = evaluate_generation(
        runner, items, cfg.cfg_scales, judge=judge, decoder_guidance=cfg.decoder_guidance,
        decoder_steps=cfg.decoder_steps, recon=cfg.recon, seed=seed, keep_images=cfg.report_samples,
        collect=collected if want_real else None, log=log, retrieval_pool=cfg.retrieval_pool,
    )
    judge_ok = bool(judge_stats["judge_ok"])
    # the judge failed its own test (or there is none): its verdicts on generations do not count
    # (its reading of the real held-out images still shows, to say why)
    kept = {k: v for k, v in gen_metrics.items() if judge_ok or "/judge/" not in k or "/reference/" in k}
    return GenerationResult(kept, records, gallery, collected, judge_stats, params)


def evaluate_all(paths: dict[str, str], cfg: EvalConfig, out_dir: str, pipeline_seed: int = 0,
                 device: str = "cpu", log: Callable[[str], None] = _log,
                 start_qa: Optional[QAStarter] = None,
                 ) -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Run every evaluation, write metrics.json / samples.jsonl / report.html into ``out_dir``;
    returns (all metrics, headline metrics, protocol params). ``paths``: vpit_model, tokenizer,
    vision_encoder, decoder, mixture and (optional) judge directories. ``start_qa`` runs the QA
    pass (default: here, after the generations); both halves are deterministic, so where the QA
    pass runs does not change a figure as long as it runs on the same number of threads."""
    import torch

    from metamorph.eval.heldout import load_heldout
    from metamorph.eval.inference import VPiTRunner

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = pipeline_seed * 1_000_003 + cfg.seed
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("evaluate.use_gpu is true but this Ray task sees no CUDA device")
    runner = VPiTRunner.from_dirs(paths["vpit_model"], paths["tokenizer"], paths["vision_encoder"], paths["decoder"], device)
    heldout = load_heldout(paths["mixture"], cfg.caps(), seed)
    metrics: dict[str, float] = {f"heldout_n/{t}": float(len(v)) for t, v in heldout.items()}
    log("held-out items: " + ", ".join(f"{t}={len(v)}" for t, v in heldout.items()))

    # --- understanding: the QA pass, started first so it can run elsewhere meanwhile
    qa_samples = [si for t in QA_TASKS for si in heldout.get(t, [])]
    answers = (start_qa or ask_here(device, log, runner))(paths, cfg, qa_samples)

    # --- generation, decoded and judged, here (this process has the decoder loaded already)
    gen = generate_and_judge(paths, cfg, [si for t in GEN_TASKS for si in heldout.get(t, [])], seed, device, log, runner)
    metrics.update(gen.judge_stats)
    metrics.update({f"gen/{k}": v for k, v in gen.metrics.items()})
    params: dict[str, Any] = dict(gen.params)
    judge_ok = bool(metrics["judge_ok"])
    gen_records, gallery, collected = gen.records, gen.gallery, gen.collected

    qa_result = answers()
    qa, qa_records = question_items(cfg, qa_samples), qa_result.records
    metrics.update(qa_result.metrics)

    # --- real-data metrics (FID / CLIP score) on the t2i generations at the first scale
    from metamorph.eval.fid import real_data_metrics

    s0 = cfg.cfg_scales[0]
    full = collected.get(f"t2i/{s0:g}")
    dec = runner.decoder.config if runner.decoder is not None else {}
    protocol = {
        "guidance": cfg.decoder_guidance if cfg.decoder_guidance is not None else dec.get("guidance_scale"),
        "steps": cfg.decoder_steps if cfg.decoder_steps is not None else dec.get("num_inference_steps"),
        "sampler": dec.get("sampler"),
        "visual_cfg_scale": s0,
    }
    full = full or {"generated": [], "reference": [], "text": []}  # skipped, with the reason
    fm, fp, skipped = real_data_metrics(cfg.fid, full["generated"], full["reference"], full["text"], protocol)
    metrics.update(fm)
    params.update(fp)
    params.update({f"skipped_{k}": v for k, v in skipped.items()})

    # --- benchmark files
    from metamorph.eval.tsv import read_tsv, score_items

    tsv_records: list[dict[str, Any]] = []
    tsv_tables: dict[str, dict[str, float]] = {}
    for p in cfg.tsv_paths:
        name = Path(p).stem
        m, recs = score_items(runner, read_tsv(p, cfg.tsv_limit))
        tsv_tables[name] = m
        metrics.update({f"bench/{name}/{k}": v for k, v in m.items()})
        tsv_records.extend({"kind": "benchmark", "benchmark": name, **r} for r in recs)
        log(f"benchmark {name}: acc {m.get('acc', float('nan')):.3f} on {int(m['n_scored'])} rows")

    # --- headline (parent run)
    metrics = {metric_key(k): v for k, v in metrics.items()}
    headline = headline_metrics(metrics, cfg.cfg_scales[0], judge_ok)
    metrics["seconds"] = time.perf_counter() - t0
    records = qa_records + gen_records + tsv_records
    metrics["n_records"] = float(len(records))

    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n")
    (out / "metrics.json").write_text(json.dumps({"metrics": metrics, "headline": headline, "params": params},
                                                 indent=2, sort_keys=True, default=_jsonable))
    write_report(out / "report.html", cfg, metrics, headline, params, qa, qa_records, gallery, tsv_tables)
    write_gallery(out, gallery)
    log(f"done in {metrics['seconds']:.1f}s: " + ", ".join(f"{k}={v:.3f}" for k, v in headline.items()))
    return metrics, headline, params


def metric_key(name: str) -> str:
    """An MLflow-safe metric name (benchmark categories may hold '&', '(' ...)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def headline_metrics(metrics: dict[str, float], s0: float, judge_ok: bool) -> dict[str, float]:
    h: dict[str, float] = {}
    pick = {
        "qa_acc": "qa_acc",
        "qa_majority": "qa_majority",
        "qa_majority_heldout": "qa_majority_heldout",
        "judge_acc": "judge_acc_min",
        "judge_ok": "judge_ok",
        "token_cosine": f"gen/t2i/cfg{s0:g}/cosine",
        "retrieval_top1": f"gen/t2i/cfg{s0:g}/retrieval_top1",
        "fd_encoder": f"gen/t2i/cfg{s0:g}/fd_encoder",
        "fid": "fid",
        "clip_score": "clip_score",
    }
    for name, key in pick.items():
        if key in metrics and not (isinstance(metrics[key], float) and math.isnan(metrics[key])):
            h[HEADLINE_PREFIX + name] = float(metrics[key])
    attrs = [metrics.get(f"gen/t2i/cfg{s0:g}/judge/{a}") for a in ("shape", "colour", "size", "position")]
    if judge_ok and all(a is not None for a in attrs):
        # mean over the four object attributes (background is near-trivial), first CFG scale
        h[HEADLINE_PREFIX + "gen_attr_acc"] = float(sum(attrs) / len(attrs))
    return h


def _jsonable(v: Any) -> Any:
    try:
        import numpy as np

        if isinstance(v, np.generic):
            return v.item()
    except ImportError:  # pragma: no cover
        pass
    return str(v)


def write_report(path: Path, cfg: EvalConfig, metrics, headline, params, qa_items_, qa_records, gallery, tsv_tables) -> None:
    from metamorph.eval.inference import open_image
    from metamorph.eval.intervals import cell, fmt_interval
    from metamorph.eval.judge import CHANCE_ONE_OBJECT
    from metamorph.eval.report import Mark, Report

    r = Report("MetaMorph evaluation", f"visual-token CFG scales {cfg.cfg_scales}; judge ok: {bool(metrics.get('judge_ok'))}")
    r.heading("Headline")
    s0 = f"gen/t2i/cfg{cfg.cfg_scales[0]:g}/retrieval_top1"
    ci = {"qa_acc": ("qa_ci_lo", "qa_ci_hi"), "retrieval_top1": (f"{s0}/ci_lo", f"{s0}/ci_hi")}  # Wilson 95%
    r.metrics({k[len(HEADLINE_PREFIX):]: (fmt_interval(v, *(metrics.get(b) for b in ci[k[len(HEADLINE_PREFIX):]]))
                                          if k[len(HEADLINE_PREFIX):] in ci else v) for k, v in headline.items()},
              note="gen_attr_acc: mean judged accuracy of shape/colour/size/position on t2i at the first CFG scale; "
                   "shown only when the judge passed its own test.")

    # understanding
    if "qa_acc" in metrics:
        r.heading("Understanding: held-out QA (exact match)")
        rows = [["all", int(metrics["qa_n"]), cell(metrics, "qa_acc", "qa_ci_lo", "qa_ci_hi"), metrics["qa_majority"], metrics["qa_majority_heldout"]]]
        for k in sorted(m for m in metrics if m.startswith("qa_acc/")):
            key = k[len("qa_acc/"):]
            rows.append([key, int(metrics.get(f"qa_n/{key}", 0)), cell(metrics, k, f"qa_ci_lo/{key}", f"qa_ci_hi/{key}"),
                         metrics.get(f"qa_majority/{key}"), metrics.get(f"qa_majority_heldout/{key}")])
        r.table(["task / attribute", "n", "accuracy [Wilson 95%]", "majority baseline", "held-out majority (upper bound)"], rows,
                note="majority baseline: always giving the most common training answer of the item's "
                     f"(task, attribute, open/multiple-choice) group ({int(metrics.get('qa_prior_items', 0))} training items), "
                     "what a model blind to the image learns; held-out majority: the most common answer "
                     "among these evaluated items themselves, the best any blind answerer could do on them")
        grid = []
        for it, rec in list(zip(qa_items_, qa_records))[: cfg.report_samples * 2]:
            imgs = [open_image(b) for b in it.images[:4]]
            grid.append([rec["task"], imgs, rec["question"], Mark(rec["prediction"], rec["correct"]), rec["truth"]])
        r.table(["task", "image(s)", "question", "answer", "truth"], grid, title="samples", img_px=64)

    # generation
    tasks = [t for t in ("t2i", "image_edit", "frame_prediction") if f"gen/{t}/n" in metrics]
    judged_ok = bool(metrics.get("judge_ok"))  # a failed judge's verdicts are not shown per sample either
    if tasks:
        r.heading("Generation")
        attrs = ("shape", "colour", "size", "position", "background", "all")
        for t in tasks:
            rows = []
            for s in cfg.cfg_scales:
                p = f"gen/{t}/cfg{s:g}"
                rows.append([f"LLM cfg {s:g}", metrics.get(f"{p}/cosine"), cell(metrics, f"{p}/retrieval_top1"),
                             metrics.get(f"{p}/fd_encoder")] + [cell(metrics, f"{p}/judge/{a}") for a in attrs])
            if f"gen/{t}/recon/judge/all" in metrics:
                rows.append(["decoder(true tokens)", None, None, None] + [metrics.get(f"gen/{t}/recon/judge/{a}") for a in attrs])
            if f"gen/{t}/reference/judge/all" in metrics:
                rows.append(["judge on real images", None, None, None] + [metrics.get(f"gen/{t}/reference/judge/{a}") for a in attrs])
            if t == "t2i":
                rows.append(["chance (1 object)", None, metrics.get(f"gen/{t}/retrieval_chance"), None]
                            + [CHANCE_ONE_OBJECT.get(a) for a in attrs])
            note = f"{int(metrics[f'gen/{t}/n'])} items"
            if f"gen/{t}/image_start_p" in metrics:
                note += f"; P(<image_start> first, unforced) = {metrics[f'gen/{t}/image_start_p']:.3f}"
            if not metrics.get("judge_ok"):
                note += "; judged columns withheld: the judge failed its own accuracy threshold"
            r.table(["", "token cosine", "retrieval top-1 [Wilson 95%]", "Frechet (encoder)"] + [f"judged {a}" for a in attrs],
                    rows, title=t, note=note)
            grid = []
            for e in gallery.get(t, [])[: cfg.report_samples]:
                row = [e["text"], e["inputs"] or ""]
                for s in cfg.cfg_scales:
                    img = e["generated"].get(f"{s:g}")
                    sc = e["scores"].get(f"{s:g}")
                    row.append(img if img is not None else "")
                    if judged_ok:
                        row.append(Mark(", ".join(k for k, v in sc.items() if v < 1 and k != "all") or "all right",
                                        sc["all"] == 1.0) if sc else "")
                row += [e["recon"] if e["recon"] is not None else "", e["reference"]]
                grid.append(row)
            header = ["prompt", "input(s)"]
            for s in cfg.cfg_scales:
                header += [f"generated (cfg {s:g})"] + (["judged wrong"] if judged_ok else [])
            header += ["decoder(true tokens)", "reference"]
            r.table(header, grid, title=f"{t} samples", img_px=96)

    if tsv_tables:
        r.heading("Benchmarks (VLMEvalKit TSV, option-letter likelihood)")
        for name, m in tsv_tables.items():
            r.metrics(m, title=name)
    r.heading("Parameters")
    r.metrics({k: v for k, v in sorted(params.items())})
    r.heading("All metrics")
    r.metrics({k: v for k, v in sorted(metrics.items())})
    r.write(path)
