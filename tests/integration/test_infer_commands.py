"""`metamorph generate` and `metamorph chat` on a tiny random model saved with save_pretrained.

    pytest -q tests/integration/test_infer_commands.py

The run root is laid out like a pipeline's (stage dirs with `_SUCCESS.json` manifests), so the
commands find the tokenizer, vision encoder and decoder the way they would after `metamorph run`;
an MLflow store with a parent run and its stage children checks resolution by run id and name.
No Ray: the commands run in-process through typer's CliRunner.
"""

from __future__ import annotations


import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from pipelines.infer import ResolveError, register, resolve
from tests.unit.eval_fixtures import build_run, red_square_png

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    paths = build_run(root, n_per_task=1)
    return root, paths


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


def invoke(app, args):
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    return res


def test_generate_from_model_dir(app, run, tmp_path):
    root, paths = run
    out = tmp_path / "gen" / "out.png"
    res = invoke(app, ["generate", "--model", str(paths["vpit_model"]), "Generate an image of a red circle",
                       "-o", str(out), "--steps", "2", "--cfg-scale", "2.0"])
    assert res.exit_code == 0, res.output
    with Image.open(out) as im:
        assert im.size == (32, 32) and im.mode == "RGB"
    # the decoder was found through the manifests (same upstream vision_encoder key)
    r = resolve(str(paths["vpit_model"]))
    assert r.decoder == paths["decoder"].resolve() or r.decoder == paths["decoder"]
    assert r.vision_encoder.resolve() == paths["vision_encoder"].resolve()
    assert r.tokenizer.resolve() == paths["vpit_model"].resolve()  # the tokenizer saved beside the model


def test_chat_with_image(app, run, tmp_path):
    root, paths = run
    img = red_square_png(tmp_path / "x.png")
    stage_dir = paths["vpit_model"].parent  # the stage dir works as --model too
    res = invoke(app, ["chat", "--model", str(stage_dir), "--image", str(img), "What colour is the square?",
                       "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    # a random model says something arbitrary; the command must print one answer line
    assert res.stdout.endswith("\n")
    bad = invoke(app, ["chat", "--model", str(stage_dir), "--image", str(img), "<image> and <image>?"])
    assert bad.exit_code == 2 and "placeholders" in bad.output


def test_resolve_by_mlflow_run(run, tmp_path):
    from pipelines.tracking import Tracker, default_uri

    root, paths = run
    tracker = Tracker(default_uri(root), "metamorph", (root / "mlartifacts").as_uri())
    parent = tracker.start_run("tiny-run", tags={"run_root": str(root)})
    for stage, d in (("train_vpit", paths["vpit_model"]), ("train_decoder", paths["decoder"]),
                     ("vision_encoder", paths["vision_encoder"])):
        tracker.start_run(stage, tags={"stage": stage, "cache_key": d.parent.name}, parent_id=parent.run_id)
    for ref in (parent.run_id, "tiny-run"):
        r = resolve(ref, run_root=root)
        assert r.model.resolve() == paths["vpit_model"].resolve(), ref
        assert r.decoder is not None and r.decoder.resolve() == paths["decoder"].resolve()
    with pytest.raises(ResolveError, match="no MLflow run"):
        resolve("no-such-run", run_root=root)
    with pytest.raises(ResolveError, match="no MLflow store"):
        resolve("some-run", run_root=tmp_path / "empty")


def test_missing_decoder_is_a_clear_error(app, run, tmp_path):
    _, paths = run
    # a copy of the model outside any run root: no manifests to follow
    import shutil

    lone = tmp_path / "lone"
    shutil.copytree(paths["vpit_model"], lone)
    res = invoke(app, ["generate", "--model", str(lone), "a red circle", "-o", str(tmp_path / "o.png")])
    assert res.exit_code == 2 and "vision encoder" in res.output
    res = invoke(app, ["generate", "--model", str(lone), "a red circle", "-o", str(tmp_path / "o.png"),
                       "--vision-encoder", str(paths["vision_encoder"]), "--decoder", str(paths["decoder"]), "--steps", "1"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.png").exists()
