"""`train_decoder` on local Ray: trains, logs to MLflow, exports a pipeline that reloads, resumes.

    python -m pytest tests/integration/test_train_decoder_stage.py -q -m integration
"""

from __future__ import annotations

import dataclasses
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from metamorph.data.schema import ImageRef, Sample, Turn
from metamorph.data.shards import ShardWriter, write_index
from metamorph.decoder.config import DecoderConfig, SamplingConfig
from metamorph.decoder.train import DecoderTrainConfig
from metamorph.model.vision import VisionConfig, VisionEncoder
from metamorph.world.render import render, sample_scene
from pipelines.stage import StageContext, TrackingHandle
from stages.train_decoder import TrainDecoder, TrainDecoderConfig

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A curated_generation artifact (t2i samples of one-object toy scenes) and a vision encoder."""
    root = tmp_path_factory.mktemp("decoder_inputs")
    curated = root / "curated_generation"
    rng = np.random.default_rng(0)
    rows = []
    for split, n in (("train", 40), ("heldout", 6)):
        with ShardWriter(curated, split) as w:
            for i in range(n):
                scene = sample_scene(rng, image_size=32, n_objects=1)
                sample = Sample(
                    id=f"gen-{split}-{i}",
                    source="world_gen",
                    family="generation",
                    task="t2i",
                    split=split,
                    conversation=[
                        Turn(role="user", content="Generate an image of a shape."),
                        Turn(role="assistant", content="<image>"),
                    ],
                    images=[ImageRef(ext="png", role="response")],
                    meta={"task": "t2i", "scene": scene.to_meta()},
                )
                w.write(sample, [_png(render(scene))])
            rows += w.rows
    write_index(curated, rows)
    encoder = root / "vision_encoder"
    VisionEncoder.from_config(VisionConfig()).save_pretrained(encoder)
    return {"curated_generation": curated, "vision_encoder": encoder}


def _cfg() -> TrainDecoderConfig:
    return TrainDecoderConfig(
        decoder=DecoderConfig(block_out_channels=[16, 32], cross_attention_dim=16, attention_heads=2),
        train=DecoderTrainConfig(max_steps=6, batch_size=8, warmup_steps=2, checkpoint_every=3, log_every=2,
                                 sample_every=3),
        sampling=SamplingConfig(num_inference_steps=3),
        n_eval=6,
        n_grid=4,
    )


def _ctx(tmp_path, inputs, tracking: TrackingHandle, **overrides) -> StageContext:
    work = tmp_path / "train_decoder" / "k.tmp"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return StageContext(
        stage="train_decoder",
        key="k",
        cfg=dataclasses.replace(_cfg(), **overrides),
        seed=0,
        inputs=inputs,
        work_dir=work,
        checkpoint_dir=tmp_path / "train_decoder" / "k.ckpt",
        run_root=tmp_path,
        tracking=tracking,
    )


def test_trains_logs_exports_and_resumes(ray_session, inputs, tmp_path):
    import mlflow

    from metamorph.decoder.pipeline import MetaMorphDecoderPipeline

    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=mlflow_uri)
    exp = client.create_experiment("decoder", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    ctx = _ctx(tmp_path, inputs, TrackingHandle(uri=mlflow_uri, run_id=run_id))

    stage = TrainDecoder()
    stage.validate(ctx.cfg)
    assert stage.resources(ctx.cfg) == {"CPU": 0.5}
    stats = stage.run(ctx)
    assert stats["steps"] == 6 and stats["resumed_from"] == 0 and stats["n_train"] == 40 and stats["n_heldout"] == 6
    assert np.isfinite(stats["first_loss"]) and np.isfinite(stats["final_loss"])
    for k in ("colour_agreement", "background_agreement", "object_iou", "token_retrieval_acc"):
        assert 0.0 <= stats[k] <= 1.0, k

    # the artifact reloads with one call and renders held-out tokens
    pipe = MetaMorphDecoderPipeline.from_pretrained(ctx.work_dir / "decoder")
    enc = VisionEncoder.from_pretrained(inputs["vision_encoder"])
    tokens = enc.encode_images([Image.new("RGB", (32, 32), (220, 20, 20))])
    assert pipe(tokens, num_inference_steps=2).images[0].size == (32, 32)

    # MLflow got the losses (rank 0, from the worker) and the sample grids
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [2, 4, 6]
    arts = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert {"samples/step-00000003.png", "samples/step-00000006.png", "samples/heldout_final.png"} <= arts

    # a rerun after a crash at step 4: the step-3 checkpoint survives, training resumes from it.
    # This time the tokens come from a Ray Data encoder actor (an operational knob): the resumed
    # run only matches if they equal the driver-computed ones.
    ckpt = ctx.checkpoint_dir
    shutil.rmtree(ckpt / "export")
    shutil.rmtree(ckpt / "loop" / "step-00000006")
    stats2 = stage.run(_ctx(tmp_path, inputs, TrackingHandle(), num_encoders=1, encoder_cpus=0.5))
    assert stats2["resumed_from"] == 3 and stats2["steps"] == 6
    assert stats2["first_loss"] == stats["first_loss"]
    assert stats2["final_loss"] == pytest.approx(stats["final_loss"], rel=1e-4)

    # a rerun with the export in place trains nothing
    stats3 = stage.run(_ctx(tmp_path, inputs, TrackingHandle()))
    assert stats3["resumed_from"] == 3 and stats3["final_loss"] == stats2["final_loss"]
