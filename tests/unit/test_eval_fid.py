"""FID / CLIP score: skipped cleanly without weights, computed with weights given by path.

    pytest -q tests/unit/test_eval_fid.py

Real Inception / CLIP weights are never downloaded: a tiny TorchScript extractor with the
clean-fid calling convention and a tiny random CLIP saved with save_pretrained stand in.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from metamorph.eval.fid import FIDConfig, clip_score, inception_features, real_data_metrics


class TinyExtractor(torch.nn.Module):
    """forward(x [B,3,299,299] in 0..255, return_features) -> per-channel means and stds [B, 6]."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1) / 255.0


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, still the FID file format
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyExtractor()).save(str(d / "inception.pt"))
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from tests.unit.eval_fixtures import build_tokenizer, make_samples

    tok = build_tokenizer(make_samples(1), d / "clip")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(d / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(d / "clip")
    return d


def _images(colours):
    return [Image.new("RGB", (32, 32), c) for c in colours]


def test_skipped_without_weights():
    m, p, skipped = real_data_metrics(FIDConfig(), _images(["red", "blue"]), _images(["red", "blue"]), ["a", "b"],
                                      {"guidance": 3.0, "steps": 25, "sampler": "ddim"})
    assert m == {} and "inception_path" in skipped["fid"] and "clip_path" in skipped["clip_score"]
    assert p["fid_guidance"] == 3.0 and p["fid_steps"] == 25 and p["fid_n_samples"] == 2
    m, _, skipped = real_data_metrics(FIDConfig(inception_path="/nonexistent.pt"), _images(["red"] * 2),
                                      _images(["red"] * 2), ["a"] * 2, {})
    assert "not a file" in skipped["fid"]


def test_fid_with_torchscript_extractor(weights):
    feats = inception_features(weights / "inception.pt", _images([(255, 0, 0), (0, 0, 255)]))
    assert feats.shape == (2, 6) and feats[0, 0] == pytest.approx(1.0) and feats[1, 2] == pytest.approx(1.0)
    cfg = FIDConfig(inception_path=str(weights / "inception.pt"), resolution=16)
    rng = np.random.default_rng(0)
    ref = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    same, p, _ = real_data_metrics(cfg, ref, ref, ["x"] * 8, {"sampler": "ddim"})
    assert same["fid"] == pytest.approx(0.0, abs=1e-6)
    red = _images([(200 + i, 0, 0) for i in range(8)])
    far, _, _ = real_data_metrics(cfg, red, ref, ["x"] * 8, {})
    assert far["fid"] > 0.1
    assert p["fid_resolution"] == 16 and "torchscript" in p["fid_implementation"]


def test_clip_score_with_local_clip(weights):
    s = clip_score(weights / "clip", _images(["red", "blue", "green"]), ["a red square", "blue", "green"])
    assert 0.0 <= s <= 100.0
    m, p, skipped = real_data_metrics(FIDConfig(clip_path=str(weights / "clip")), _images(["red"]), _images(["red"]),
                                      ["a red square"], {})
    assert "clip_score" in m and "clip_score" not in skipped and "fid" in skipped
