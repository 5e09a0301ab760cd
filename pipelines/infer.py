"""Inference commands on a trained model: ``metamorph generate`` and ``metamorph chat``.

    metamorph generate --model runs/train_vpit/KEY/vpit_model "Generate an image of a red circle" -o out.png
    metamorph chat --model RUN_ID_OR_NAME --image x.png "What colour is the square?"

``--model`` is a ``vpit_model`` dir (or its stage dir ``{run_root}/train_vpit/{key}``), or an
MLflow run id / run name of a pipeline run (or of its ``train_vpit`` child) in the run root's
store. The pieces a model needs are found the way the pipeline wired them: every promoted stage
dir has ``_SUCCESS.json`` with ``upstream: {artifact: key}``, so ``train_vpit`` -> ``tokenize``
(its ``tokenizer``, and its upstream ``vision_encoder``); the decoder is the newest
``train_decoder`` output whose upstream ``vision_encoder`` key is the same. ``--tokenizer``,
``--vision-encoder`` and ``--decoder`` override any of them. ``register(app)`` adds the commands
to the ``metamorph`` CLI.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from pipelines.cache import read_manifest

console = Console(stderr=True, highlight=False)

MODEL = typer.Option(..., "--model", "-m", help="a vpit_model dir, its stage dir, or an MLflow run id/name of a pipeline run")
RUN_ROOT = typer.Option(Path("./runs"), "--run-root", help="run root whose MLflow store resolves run ids/names")
TRACKING_URI = typer.Option(None, "--tracking-uri", help="MLflow tracking URI (default: sqlite:///{run_root}/mlflow.db)")
DECODER = typer.Option(None, "--decoder", help="decoder dir (default: the run's train_decoder output for the same encoder)")
ENCODER = typer.Option(None, "--vision-encoder", help="vision encoder dir (default: found via the run's manifests)")
TOKENIZER = typer.Option(None, "--tokenizer", help="tokenizer dir (default: the one saved beside the model)")
DEVICE = typer.Option("auto", "--device", help="cpu, cuda, cuda:1, or auto (cuda when available)")


class ResolveError(ValueError):
    """The model reference or one of its companions could not be found; the message says how to fix it."""


@dataclass
class Resolved:
    model: Path
    tokenizer: Path
    vision_encoder: Path
    decoder: Optional[Path]
    how: str  # one line: how the model was found


def _stage_dir(run_root: Path, stage: str, key: str) -> Path:
    from pipelines.cache import check_key, check_stage_name

    try:  # keys come from MLflow tags and manifests: never let one walk out of the run root
        return run_root / check_stage_name(stage) / check_key(key, f"cache key of {stage}")
    except ValueError as e:
        raise ResolveError(str(e)) from None


def _from_mlflow(ref: str, run_root: Path, tracking_uri: Optional[str]) -> tuple[Path, dict[str, Path], str]:
    """(vpit_model dir, {artifact: dir} of sibling stages of that run, description) for a run id/name."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from pipelines.tracking import default_uri

    if tracking_uri is None:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or None  # the same precedence as `metamorph run`
    if tracking_uri is None:
        if not (run_root / "mlflow.db").exists():
            raise ResolveError(f"--model {ref!r} is not a directory, and there is no MLflow store at "
                               f"{run_root / 'mlflow.db'} to look it up as a run (pass --run-root or --tracking-uri)")
        tracking_uri = default_uri(run_root)
    client = MlflowClient(tracking_uri=tracking_uri)
    run = None
    try:
        run = client.get_run(ref)
    except MlflowException:
        exps = [e.experiment_id for e in client.search_experiments()]
        safe = ref.replace("'", "\\'")
        hits = client.search_runs(exps, filter_string=f"attributes.run_name = '{safe}'",
                                  order_by=["attributes.start_time DESC"], max_results=50) if exps else []
        # a name can be both a parent run and a stage child ("train_vpit"): prefer the pipeline run
        parents = [r for r in hits if "stage" not in r.data.tags]
        run = (parents or hits or [None])[0]
    if run is None:
        raise ResolveError(f"no MLflow run with id or name {ref!r} in {tracking_uri}")
    tags = run.data.tags
    children: dict[str, object] = {}
    if tags.get("stage"):
        parent_id = tags.get("mlflow.parentRunId")
        parent = client.get_run(parent_id) if parent_id else None
        children[tags["stage"]] = run
    else:
        parent = run
    if parent is not None:
        kids = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
        for k in kids:
            children.setdefault(k.data.tags.get("stage", ""), k)
    root = run_root
    if parent is not None and "run_root" in parent.data.tags:
        from pipelines.cache import check_run_root

        try:
            root = check_run_root(parent.data.tags["run_root"], f"run_root tag of MLflow run {parent.info.run_id}")
        except ValueError as e:
            raise ResolveError(str(e)) from None
    if "train_vpit" not in children:
        raise ResolveError(f"MLflow run {ref!r} has no train_vpit stage (run a pipeline through train_vpit first)")
    dirs = {}
    for stage, artifact in (("train_vpit", "vpit_model"), ("vision_encoder", "vision_encoder"),
                            ("train_decoder", "decoder"), ("tokenize", "tokenizer")):
        if stage in children and children[stage].data.tags.get("cache_key"):
            dirs[artifact] = _stage_dir(root, stage, children[stage].data.tags["cache_key"]) / artifact
    return dirs["vpit_model"], dirs, f"MLflow run {run.info.run_id} ({run.info.run_name}) in {tracking_uri}"


def _upstream(stage_dir: Path) -> dict[str, str]:
    m = read_manifest(stage_dir)
    return dict(m.get("upstream", {})) if m else {}


def _has_tokenizer(d: Path) -> bool:
    return (d / "tokenizer.json").exists() or (d / "tokenizer_config.json").exists()


def resolve(
    model: str,
    run_root: Path = Path("./runs"),
    tracking_uri: Optional[str] = None,
    tokenizer: Optional[Path] = None,
    vision_encoder: Optional[Path] = None,
    decoder: Optional[Path] = None,
    need_decoder: bool = True,
) -> Resolved:
    """Find the model dir and its tokenizer, vision encoder and (optionally) decoder."""
    p = Path(model).expanduser()
    run_dirs: dict[str, Path] = {}
    if p.is_dir():
        if not (p / "config.json").exists() and (p / "vpit_model" / "config.json").exists():
            p = p / "vpit_model"  # the stage dir {run_root}/train_vpit/{key}
        if not (p / "config.json").exists():
            raise ResolveError(f"{p} is not a MetaMorph model dir (no config.json); pass a vpit_model dir")
        model_dir, how = p.resolve(), f"model dir {p}"
    else:
        model_dir, run_dirs, how = _from_mlflow(model, run_root.expanduser().resolve(), tracking_uri)
        if not (model_dir / "config.json").exists():
            raise ResolveError(f"the run's vpit_model dir {model_dir} is missing (was the run root moved or cleaned?)")
    stage_dir = model_dir.parent
    root = stage_dir.parent.parent
    up = _upstream(stage_dir)
    tok_stage = _stage_dir(root, "tokenize", up["tokenized"]) if "tokenized" in up else None
    enc_key = _upstream(tok_stage).get("vision_encoder") if tok_stage is not None else None

    if tokenizer is None:
        if _has_tokenizer(model_dir):
            tokenizer = model_dir
        elif tok_stage is not None and _has_tokenizer(tok_stage / "tokenizer"):
            tokenizer = tok_stage / "tokenizer"
        elif "tokenizer" in run_dirs:
            tokenizer = run_dirs["tokenizer"]
        else:
            raise ResolveError(f"no tokenizer beside {model_dir} and none found via its manifest; pass --tokenizer")
    if vision_encoder is None:
        if (model_dir / "vision_encoder" / "config.json").exists():
            vision_encoder = model_dir / "vision_encoder"
        elif enc_key is not None and (_stage_dir(root, "vision_encoder", enc_key) / "vision_encoder").is_dir():
            vision_encoder = _stage_dir(root, "vision_encoder", enc_key) / "vision_encoder"
        elif "vision_encoder" in run_dirs and run_dirs["vision_encoder"].is_dir():
            vision_encoder = run_dirs["vision_encoder"]
        else:
            raise ResolveError(
                f"cannot find the vision encoder of {model_dir}: its train_vpit manifest should lead to "
                f"{root}/tokenize/KEY/_SUCCESS.json -> vision_encoder; pass --vision-encoder"
            )
    if decoder is None and need_decoder:
        decoder = _find_decoder(root, enc_key)
        if decoder is None and "decoder" in run_dirs and run_dirs["decoder"].is_dir():
            decoder = run_dirs["decoder"]
        if decoder is None:
            raise ResolveError(
                f"no train_decoder output under {root}/train_decoder whose upstream vision_encoder is "
                f"{enc_key!r}; pass --decoder PATH (a decoder dir written by train_decoder)"
            )
    return Resolved(Path(model_dir), Path(tokenizer), Path(vision_encoder), Path(decoder) if decoder else None, how)


def _find_decoder(root: Path, enc_key: Optional[str]) -> Optional[Path]:
    """The newest completed train_decoder output trained on the encoder ``enc_key``."""
    if enc_key is None or not (root / "train_decoder").is_dir():
        return None
    best, best_t = None, -1.0
    for d in (root / "train_decoder").iterdir():
        m = read_manifest(d)
        if not m or m.get("upstream", {}).get("vision_encoder") != enc_key or not (d / "decoder").is_dir():
            continue
        t = float(m.get("finished_at") or 0)
        if t > best_t:
            best, best_t = d / "decoder", t
    return best


def _device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _runner(r: Resolved, device: str, with_decoder: bool):
    # a command's output is its answer: no loading bars or accelerate hints from the libraries
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from metamorph.eval.inference import VPiTRunner

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()

    return VPiTRunner.from_dirs(r.model, r.tokenizer, r.vision_encoder, r.decoder if with_decoder else None, _device(device))


def _resolve_or_exit(**kw) -> Resolved:
    try:
        r = resolve(**kw)
    except (ResolveError, FileNotFoundError) as e:
        console.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2)
    console.print(f"[dim]{r.how}; tokenizer {r.tokenizer}; encoder {r.vision_encoder}; decoder {r.decoder}[/]")
    return r


def generate(
    prompt: str = typer.Argument(..., help='what to draw, e.g. "Generate an image of a red circle"'),
    model: str = MODEL,
    output: Path = typer.Option(Path("out.png"), "--output", "-o", help="PNG file to write"),
    cfg_scale: float = typer.Option(1.0, "--cfg-scale", help="visual-token CFG scale in the LLM (1 = off)"),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="decoder CFG scale (default: the decoder's own)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="decoder denoising steps (default: the decoder's own)"),
    seed: int = typer.Option(0, "--seed", help="decoder noise seed"),
    run_root: Path = RUN_ROOT,
    tracking_uri: Optional[str] = TRACKING_URI,
    decoder: Optional[Path] = DECODER,
    vision_encoder: Optional[Path] = ENCODER,
    tokenizer: Optional[Path] = TOKENIZER,
    device: str = DEVICE,
) -> None:
    """Draw an image: the model predicts vision tokens for the prompt, the decoder renders them."""
    r = _resolve_or_exit(model=model, run_root=run_root, tracking_uri=tracking_uri, tokenizer=tokenizer,
                         vision_encoder=vision_encoder, decoder=decoder, need_decoder=True)
    runner = _runner(r, device, with_decoder=True)
    pred = runner.predict_tokens(prompt, cfg_scale=cfg_scale, seed=seed)
    image = runner.render(pred.tokens[0][None], guidance_scale=guidance, num_inference_steps=steps, seed=seed)[0]
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output)
    if pred.text:
        console.print(f"model text after the image: {pred.text!r}")
    print(output)


def chat(
    prompt: str = typer.Argument(..., help='the question, e.g. "What colour is the square?"'),
    model: str = MODEL,
    image: List[Path] = typer.Option([], "--image", "-i", help="image file(s) shown with the question (repeatable)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="answer length cap in tokens"),
    image_out: Optional[Path] = typer.Option(None, "--image-out", help="let the model draw: save its image here"),
    run_root: Path = RUN_ROOT,
    tracking_uri: Optional[str] = TRACKING_URI,
    decoder: Optional[Path] = DECODER,
    vision_encoder: Optional[Path] = ENCODER,
    tokenizer: Optional[Path] = TOKENIZER,
    device: str = DEVICE,
) -> None:
    """Ask about image(s); prints the model's answer (greedy)."""
    from metamorph.data.schema import IMAGE_PLACEHOLDER

    for p in image:
        if not p.is_file():
            console.print(f"[bold red]error:[/] image {p} not found")
            raise typer.Exit(2)
    r = _resolve_or_exit(model=model, run_root=run_root, tracking_uri=tracking_uri, tokenizer=tokenizer,
                         vision_encoder=vision_encoder, decoder=decoder, need_decoder=image_out is not None)
    runner = _runner(r, device, with_decoder=image_out is not None)
    n_ph = prompt.count(IMAGE_PLACEHOLDER)
    if n_ph == 0 and image:
        prompt = IMAGE_PLACEHOLDER * len(image) + "\n" + prompt  # LLaVA's layout: images first
    elif n_ph != len(image):
        console.print(f"[bold red]error:[/] the prompt has {n_ph} {IMAGE_PLACEHOLDER} placeholders for {len(image)} --image files")
        raise typer.Exit(2)
    out = runner.answer(prompt, [str(p) for p in image], max_new_tokens=max_new_tokens,
                        max_images=1 if image_out is not None else 0)
    if image_out is not None and out.tokens:
        runner.render(out.tokens[0][None])[0].save(image_out)
        console.print(f"image written to {image_out}")
    print(out.text)
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add ``generate`` and ``chat`` to the ``metamorph`` CLI."""
    app.command("generate")(generate)
    app.command("chat")(chat)
