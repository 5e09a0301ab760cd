"""Vision-encoder pretraining (SigLIP sigmoid loss on toy captions), its probes and the stage's floor gate."""

from __future__ import annotations

import pytest
import torch

from metamorph.model import vision_pretrain as VP
from metamorph.model.config import VisionConfig, VisionPretrainConfig
from metamorph.model.vision import VisionEncoder

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, n_tokens=16)


def test_sigmoid_loss_prefers_matching_pairs():
    x = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    scale, bias = torch.tensor(2.3), torch.tensor(-5.0)
    assert VP.sigmoid_loss(x, x, scale, bias) < VP.sigmoid_loss(x, x.roll(1, 0), scale, bias)


def test_variant_groups_differ_in_one_attribute_of_the_first_object():
    enc = VisionEncoder.from_config(VisionConfig(**SMALL))
    data = VP.render_scenes(40, enc, VisionPretrainConfig(jitter=0.0), seed=3, min_objects=1, max_objects=3, group=4)
    for g in range(0, 40, 4):
        base = {a: data.labels[a][g] for a in ("colour", "shape", "size", "position")}
        for j in range(g + 1, g + 4):
            diff = [a for a in base if data.labels[a][j] != base[a]]
            assert len(diff) == 1, (g, j, diff, data.captions[g], data.captions[j])
            assert data.labels["count"][j] == data.labels["count"][g]


def test_pretrain_moves_the_tower_and_refreezes_it():
    enc = VisionEncoder.from_config(VisionConfig(**SMALL))
    before = [p.clone() for p in enc.model.parameters()]
    stats = VP.pretrain(enc, VisionPretrainConfig(steps=4, batch_size=16, n_images=64))
    assert stats["pretrain_loss"] == stats["pretrain_loss"]  # not NaN
    assert any(not torch.equal(a, b) for a, b in zip(before, enc.model.parameters()))
    assert not any(p.requires_grad for p in enc.model.parameters()) and not enc.model.training


def test_probes_and_floor_gate_name_the_attribute():
    enc = VisionEncoder.from_config(VisionConfig(**SMALL))
    probes = VP.probe_attributes(enc, VisionPretrainConfig(probe_train=200, probe_test=100, jitter=0.0))
    assert set(probes) == set(VP.PROBE_ATTRIBUTES) and all(0.0 <= v <= 1.0 for v in probes.values())
    # position is the easiest to read from a token grid: far above chance (1/9) even at random init
    assert probes["position"] > 0.5
    with pytest.raises(RuntimeError, match="shape"):
        VP.check_floors(probes, {"shape": 1.01})
    VP.check_floors(probes, {"position": 0.5})
    with pytest.raises(ValueError, match="probe_floors"):
        VisionPretrainConfig(probe_floors={"texture": 0.5})


def test_stage_pretrains_logs_probes_and_fails_below_floor(tmp_path):
    from pipelines.testing import run_stage
    from stages.vision_encoder import VisionEncoderConfig, VisionEncoderStage

    pre = dict(steps=3, batch_size=16, n_images=64, probe_train=100, probe_test=50)
    cfg = VisionEncoderConfig(**SMALL, pretrain=VisionPretrainConfig(**pre))
    out, stats = run_stage(VisionEncoderStage(), cfg, root=tmp_path / "ok")
    assert {f"probe/{a}" for a in VP.PROBE_ATTRIBUTES} <= set(stats)
    enc = VisionEncoder.from_pretrained(out / "vision_encoder")
    ref = VisionEncoder.from_config(cfg.encoder_config())
    im = VP.render_scenes(2, ref, cfg.pretrain, seed=9, min_objects=1, max_objects=1).pixels_BCSS
    assert not torch.allclose(enc.encode(im), ref.encode(im))  # the saved tower is the pretrained one
    bad = VisionEncoderConfig(**SMALL, pretrain=VisionPretrainConfig(**pre, probe_floors={"shape": 1.01}))
    with pytest.raises(RuntimeError, match="shape .* < floor"):
        run_stage(VisionEncoderStage(), bad, root=tmp_path / "bad")


def test_probe_never_trains_on_a_test_scene():
    # centred one-object scenes: 1620 exist, so 3000 test draws leave almost none unseen to train on;
    # the probe refuses rather than scoring images it was fitted on
    enc = VisionEncoder.from_config(VisionConfig(**SMALL))
    cfg = VisionPretrainConfig(probe_train=400, probe_test=3000, jitter=0.0, max_objects=1)
    with pytest.raises(ValueError, match="probe_test"):
        VP.probe_attributes(enc, cfg)
    a = VP.render_scenes(300, enc, VisionPretrainConfig(jitter=0.0), seed=1, min_objects=1, max_objects=1)
    assert len(set(a.keys)) < len(a.keys)  # repeats exist among independent draws: why the filter is needed
