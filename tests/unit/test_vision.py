"""Vision encoder wrapper: feature recipe, freezing, determinism, persistence.

    pytest tests/unit/test_vision.py -q
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metamorph.model.vision import VisionConfig, VisionEncoder


def _images():
    return [Image.new("RGB", (40, 40), c) for c in ("red", "blue", "white")]


@pytest.fixture(scope="module")
def enc():
    return VisionEncoder.from_config(VisionConfig())


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_tokens"):
        VisionConfig(n_tokens=15)
    with pytest.raises(ValueError, match="patch_size"):
        VisionConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        VisionConfig(hidden_size=65, num_heads=2)


def test_shapes_norms_and_frozen(enc):
    px = enc.preprocess(_images())
    assert px.shape == (3, 3, 32, 32)
    # SigLIP normalisation maps pure red to (+1, -1, -1)
    assert torch.allclose(px[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    f = enc.encode(px)
    assert f.shape == (3, 16, 64) and f.dtype == torch.float32
    assert enc.feature_dim == 64 and enc.n_tokens == 16
    assert torch.allclose(f.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    assert not f.requires_grad
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.training and not enc.model.training


def test_feature_is_pre_post_layernorm_bilinear_resized(enc):
    px = enc.preprocess(_images())
    with torch.no_grad():
        out = enc.model(pixel_values=px, output_hidden_states=True)
    last = out.hidden_states[-1]  # last encoder layer, before post_layernorm
    assert not torch.allclose(last, out.last_hidden_state)  # post-LN really is different
    B, P, D = last.shape  # 8x8 patch grid
    grid = last.transpose(1, 2).reshape(B, D, 8, 8)
    want = F.interpolate(grid, size=(4, 4), mode="bilinear", align_corners=False)
    want = F.normalize(want.flatten(2).transpose(1, 2), dim=-1)
    assert torch.allclose(enc.encode(px), want, atol=1e-5)
    # (an exact 2x bilinear downsample equals 2x2 average pooling; at other ratios, e.g. the
    # paper's 27 -> 8, bilinear samples only the 2x2 neighbourhood of each target point)


def test_seed_determinism_and_rng_untouched():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = VisionEncoder.from_config(VisionConfig(seed=0))
    after = torch.rand(1)
    assert torch.equal(before, after)  # building does not consume the caller's RNG
    b = VisionEncoder.from_config(VisionConfig(seed=0))
    c = VisionEncoder.from_config(VisionConfig(seed=1))
    px = a.preprocess(_images())
    assert torch.equal(a.encode(px), b.encode(px))
    assert not torch.allclose(a.encode(px), c.encode(px))


def test_save_load_round_trip(enc, tmp_path):
    enc.save_pretrained(tmp_path / "ve")
    assert (tmp_path / "ve" / "model.safetensors").exists()
    assert json.loads((tmp_path / "ve" / "metamorph_vision.json").read_text())["n_tokens"] == 16
    back = VisionEncoder.from_pretrained(tmp_path / "ve")
    assert back.cfg == enc.cfg
    ims = _images()
    assert torch.equal(back.encode_images(ims), enc.encode_images(ims))
    # from_config with a path loads it, and may change N without touching the weights
    via_path = VisionEncoder.from_config(VisionConfig(path=str(tmp_path / "ve"), n_tokens=4))
    assert via_path.encode_images(ims).shape == (3, 4, 64)


def test_stage_writes_loadable_encoder(tmp_path):
    from pipelines.testing import run_stage
    from stages.vision_encoder import VisionEncoderConfig, VisionEncoderStage

    stage = VisionEncoderStage()
    cfg = VisionEncoderConfig()  # pretrain.steps=0: the seeded random init
    stage.validate(cfg)
    out, stats = run_stage(stage, cfg, root=tmp_path)
    assert stats["feature_dim"] == 64 and stats["n_tokens"] == 16
    enc = VisionEncoder.from_pretrained(out / "vision_encoder")
    ref = VisionEncoder.from_config(cfg.encoder_config())
    assert torch.equal(enc.encode_images(_images()), ref.encode_images(_images()))
    # a path config loads that checkpoint; a missing path fails validation
    stage.validate(VisionConfig(path=str(out / "vision_encoder")))
    assert stage.fingerprint(VisionConfig(path=str(out / "vision_encoder")))["checkpoint"]
    with pytest.raises(ValueError, match="path"):
        stage.validate(VisionConfig(path=str(tmp_path / "nope")))


def test_loads_vision_tower_of_a_full_siglip_checkpoint(tmp_path):
    """The cluster path: a SiglipModel (text + vision) dir with its preprocessor config."""
    from transformers import SiglipConfig, SiglipModel

    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
              patch_size=4)
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50)
    full = SiglipModel(SiglipConfig(text_config=tc, vision_config=vc))
    full.save_pretrained(tmp_path / "siglip")
    (tmp_path / "siglip" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.4, 0.5, 0.6], "image_std": [0.2, 0.3, 0.4]}))
    enc = VisionEncoder.from_config(VisionConfig(path=str(tmp_path / "siglip"), n_tokens=9))
    assert (enc.cfg.image_size, enc.cfg.hidden_size, enc.cfg.image_mean) == (28, 32, [0.4, 0.5, 0.6])
    assert torch.equal(enc.model.encoder.layers[1].mlp.fc2.weight, full.vision_model.encoder.layers[1].mlp.fc2.weight)
    assert enc.encode_images(_images()).shape == (3, 9, 32)  # 7x7 patch grid -> 3x3 tokens
