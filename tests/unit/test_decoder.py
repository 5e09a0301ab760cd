"""The diffusion decoder: loss, guidance, export round trip, checkpoint resume (no Ray).

    python -m pytest tests/unit/test_decoder.py -q
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from metamorph.decoder.conditioning import VisionConditioner
from metamorph.decoder.config import DecoderConfig, SamplingConfig
from metamorph.decoder.metrics import image_grid, pair_rows, reconstruction_agreement
from metamorph.decoder.pipeline import MetaMorphDecoderPipeline, make_sampler
from metamorph.train.checkpoint import list_checkpoints as complete_checkpoints, step_dir
from metamorph.decoder.train import (
    COMPLETE,
    DecoderData,
    DecoderTrainConfig,
    Denoiser,
    batch_indices,
    diffusion_loss,
    edge_weights,
    set_trainable,
    step_draws,
    to_unit_range,
    train_loop,
)

N, D = 4, 8  # tokens per image, token width


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These UNets are tiny: with 2 threads on a shared 2-core box, OpenMP synchronisation made a
    # step ~50x slower (1.0 s vs 0.02 s measured) than with one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**kw) -> DecoderConfig:
    base = dict(image_size=16, pixel_patch=2, block_out_channels=[16, 32], cross_attention_dim=16, attention_heads=2)
    return DecoderConfig(**{**base, **kw})


def tiny_pipe(seed: int = 0, **kw) -> MetaMorphDecoderPipeline:
    return MetaMorphDecoderPipeline.from_decoder_config(tiny_cfg(**kw), feature_dim=D, n_tokens=N, seed=seed)


def tokens(b: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(b, N, D, generator=torch.Generator().manual_seed(seed)), dim=-1)


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def toy_data(m: int = 8, size: int = 16) -> DecoderData:
    """Flat-coloured squares whose tokens carry the colour: learnable in a few steps."""
    rng = np.random.default_rng(0)
    imgs, toks = [], []
    for _ in range(m):
        colour = rng.integers(0, 256, 3)
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        arr[4:12, 4:12] = colour
        imgs.append(png(arr))
        t = torch.zeros(N, D)
        t[:, :3] = torch.tensor(colour / 255.0, dtype=torch.float32)
        t[:, 3] = 0.5
        toks.append(F.normalize(t, dim=-1))
    return DecoderData(images=imgs, tokens_BND=torch.stack(toks))


def weights(pipe: MetaMorphDecoderPipeline) -> dict[str, torch.Tensor]:
    out = {f"c.{k}": v.clone() for k, v in pipe.conditioner.state_dict().items()}
    out.update({f"u.{k}": v.clone() for k, v in pipe.unet.state_dict().items()})
    return out


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="image_size"):
        DecoderConfig(image_size=30, pixel_patch=2, block_out_channels=[16, 32, 32])
    with pytest.raises(ValueError, match="pixel_patch"):
        DecoderConfig(pixel_patch=4, block_out_channels=[32, 64])  # 48 channels per position > 32
    with pytest.raises(ValueError, match="cross_attn_from_level"):
        DecoderConfig(block_out_channels=[16, 32], cross_attn_from_level=2)
    with pytest.raises(ValueError, match="cfg_prob"):
        DecoderTrainConfig(cfg_prob=1.0)
    with pytest.raises(ValueError, match="sampler"):
        SamplingConfig(sampler="euler")


def test_conditioner_zero_tokens_give_zero_context_and_padding():
    cond = VisionConditioner(feature_dim=D, n_tokens=N, cross_attention_dim=16, context_length=N + 3)
    with torch.no_grad():
        ctx = cond(tokens(2))
        null = cond(cond.null_tokens(2))
    assert ctx.shape == (2, N + 3, 16)
    assert ctx[:, :N].abs().amax() > 0 and ctx[:, N:].abs().amax() == 0  # zero-padded to L
    assert null.abs().amax() == 0  # the all-zero condition is an all-zero context
    with pytest.raises(ValueError, match="vision tokens"):
        cond(torch.zeros(2, N + 1, D))


def test_spatial_condition_lays_tokens_on_their_grid_cells():
    pipe = tiny_pipe(spatial_condition=True)
    cond = pipe.conditioner
    ctx = torch.arange(2 * N * 16, dtype=torch.float32).reshape(2, N, 16)
    x = torch.zeros(2, 12, 8, 8)  # 16 px, pixel_patch 2 -> 8x8 grid; N=4 tokens -> 2x2 cells
    out = cond.unet_input(x, ctx)
    assert out.shape == (2, 12 + 16, 8, 8) and pipe.unet.config.in_channels == 12 + 16
    side = 2
    for i in range(N):
        r, c = divmod(i, side)
        cell = out[:, 12:, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4]  # token i fills grid cell i
        torch.testing.assert_close(cell, ctx[:, i, :, None, None].expand_as(cell))
    assert tiny_pipe(spatial_condition=False).conditioner.unet_input(x, ctx) is x  # off: the paper's decoder


def test_few_steps_reduce_loss_on_a_fixed_batch():
    pipe = tiny_pipe()
    set_trainable(pipe)
    data = toy_data()
    idx = torch.arange(len(data))
    x0 = pipe.encode_pixels(to_unit_range(data.pixels(idx, 16)))
    draws = step_draws(0, 0, len(data), tuple(x0.shape[1:]), 1000, cfg_prob=0.0, noise_offset=0.0)
    model = Denoiser(pipe.unet, pipe.conditioner)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        loss = diffusion_loss(pipe, model, x0, data.tokens_BND, draws)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_v_prediction_with_zero_terminal_snr():
    pipe = tiny_pipe(prediction_type="v_prediction", zero_terminal_snr=True)
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0  # x_T is pure noise in training too
    sampler = make_sampler("ddim", pipe.scheduler.config)
    sampler.set_timesteps(4)
    assert int(sampler.timesteps[0]) == 999  # sampling starts where training saw pure noise
    set_trainable(pipe)
    data = toy_data()
    x0 = pipe.encode_pixels(to_unit_range(data.pixels(torch.arange(len(data)), 16)))
    draws = step_draws(0, 0, len(data), tuple(x0.shape[1:]), 1000, cfg_prob=0.0, noise_offset=0.0)
    draws.t_B[0] = 999  # the terminal step: target v = -x0
    model = Denoiser(pipe.unet, pipe.conditioner)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(10):
        loss = diffusion_loss(pipe, model, x0, data.tokens_BND, draws, snr_gamma=5.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    out = pipe(tokens(2), num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="zero_terminal_snr"):
        tiny_cfg(prediction_type="epsilon", zero_terminal_snr=True)  # epsilon is undefined where alpha_bar = 0


def test_min_snr_weight_keeps_the_pure_noise_end_for_v_prediction():
    """v's Min-SNR weight is min(snr + 1, g) / (snr + 1): 1 at a zero terminal SNR (where the UNet
    must draw x0 from noise + tokens), g / (snr + 1) at low noise; the old min(snr, g) / (snr + 1)
    gave the terminal step weight 0."""
    pipe = tiny_pipe(prediction_type="v_prediction", zero_terminal_snr=True)
    data = toy_data()
    x0 = pipe.encode_pixels(to_unit_range(data.pixels(torch.arange(len(data)), 16)))
    model = Denoiser(pipe.unet, pipe.conditioner)
    draws = step_draws(0, 0, len(data), tuple(x0.shape[1:]), 1000, cfg_prob=0.0, noise_offset=0.0)
    with torch.no_grad():
        for t, expect in ((999, lambda snr: 1.0), (0, lambda snr: 5.0 / (snr + 1))):
            draws.t_B[:] = t
            plain = diffusion_loss(pipe, model, x0, data.tokens_BND, draws, snr_gamma=None)
            weighted = diffusion_loss(pipe, model, x0, data.tokens_BND, draws, snr_gamma=5.0)
            ab = float(pipe.scheduler.alphas_cumprod[t])
            assert float(weighted) == pytest.approx(float(plain) * expect(ab / (1 - ab)), rel=1e-4), t


def test_sample_prediction_regresses_x0_and_weighs_it_in_x0_units():
    """x0 ('sample') prediction: the target is the clean input; its Min-SNR weight is v's in x0
    units, min(snr + 1, g) (x0-MSE = v-MSE / (snr + 1)): 1 at the zero terminal SNR, g at low noise."""
    pipe = tiny_pipe(prediction_type="sample", zero_terminal_snr=True)
    data = toy_data()
    x0 = pipe.encode_pixels(to_unit_range(data.pixels(torch.arange(len(data)), 16)))
    draws = step_draws(0, 0, len(data), tuple(x0.shape[1:]), 1000, cfg_prob=0.0, noise_offset=0.0)
    draws.t_B[:] = 999
    echo = lambda x, t, tok: x  # at T, x_t is pure noise: the "prediction" x_t misses x0 by the noise
    loss = diffusion_loss(pipe, echo, x0, data.tokens_BND, draws)
    assert float(loss) == pytest.approx(float((draws.noise_BCHW - x0).pow(2).mean()), rel=1e-5)
    model = Denoiser(pipe.unet, pipe.conditioner)
    with torch.no_grad():
        for t, expect in ((999, lambda snr: 1.0), (0, lambda snr: 5.0)):
            draws.t_B[:] = t
            plain = diffusion_loss(pipe, model, x0, data.tokens_BND, draws, snr_gamma=None)
            weighted = diffusion_loss(pipe, model, x0, data.tokens_BND, draws, snr_gamma=5.0)
            ab = float(pipe.scheduler.alphas_cumprod[t])
            assert float(weighted) == pytest.approx(float(plain) * expect(ab / (1 - ab)), rel=1e-4), t
    out = pipe(tokens(2), num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()


def test_edge_weights_favour_outlines_and_keep_the_mean():
    pipe = tiny_pipe()
    data = toy_data()
    x0 = pipe.encode_pixels(to_unit_range(data.pixels(torch.arange(len(data)), 16)))
    w = edge_weights(pipe, x0, 10.0)
    assert w.shape == x0.shape and torch.allclose(w.flatten(1).mean(dim=1), torch.ones(len(data)), atol=1e-5)
    px = pipe.decode_to_pixels(w)[:, 0]  # [B, 16, 16]: the squares span rows/cols 4..11
    assert float(px[:, 4, 4:12].mean()) > 3 * float(px[:, 0, :].mean())  # the outline outweighs the far background
    assert bool((px[:, 8, 8] < px[:, 4, 8]).all())  # the flat inside of a square too
    draws = step_draws(0, 0, len(data), tuple(x0.shape[1:]), 1000, cfg_prob=0.0, noise_offset=0.0)
    model = Denoiser(pipe.unet, pipe.conditioner)
    with torch.no_grad():
        plain = diffusion_loss(pipe, model, x0, data.tokens_BND, draws)
        weighted = diffusion_loss(pipe, model, x0, data.tokens_BND, draws, edge_weight=10.0)
    assert float(plain) != pytest.approx(float(weighted), rel=1e-3)
    with pytest.raises(ValueError, match="edge_weight"):
        DecoderTrainConfig(edge_weight=-1.0)


@pytest.mark.parametrize("spatial", [False, True])
def test_save_load_round_trip_gives_identical_samples(tmp_path, spatial):
    pipe = tiny_pipe(seed=3, context_length=N + 2, spatial_condition=spatial)
    pipe.save_pretrained(tmp_path / "dec")
    index = json.loads((tmp_path / "dec" / "model_index.json").read_text())
    assert index["conditioner"] == ["conditioning", "VisionConditioner"]  # saved code (see test_hf_export)
    assert (tmp_path / "dec" / "conditioner" / "diffusion_pytorch_model.safetensors").exists()
    loaded = MetaMorphDecoderPipeline.from_pretrained(tmp_path / "dec")
    assert loaded.config.pixel_patch == 2 and loaded.vae is None
    assert loaded.conditioner.spatial_channels == (16 if spatial else 0)
    for sampler in ("ddim", "dpm"):
        kw = dict(num_inference_steps=4, sampler=sampler, guidance_scale=2.0, output_type="pt")
        a = pipe(tokens(2), generator=torch.Generator().manual_seed(7), **kw).images
        b = loaded(tokens(2), generator=torch.Generator().manual_seed(7), **kw).images
        assert a.shape == (2, 3, 16, 16)
        assert torch.equal(a, b)
    pil = loaded(tokens(1), num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
    assert isinstance(pil[0], Image.Image) and pil[0].size == (16, 16)


def _reference_loop(pipe, ctx_BLC, steps, seed):
    """DDIM with the plain UNet prediction on ``ctx_BLC`` (no guidance arithmetic at all)."""
    sched = make_sampler("ddim", pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.randn(pipe.model_space_shape(ctx_BLC.shape[0]), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in sched.timesteps:
            x_in = pipe.conditioner.unet_input(x, ctx_BLC)
            x = sched.step(pipe.unet(x_in, t, encoder_hidden_states=ctx_BLC).sample, t, x).prev_sample
    return ((pipe.decode_to_pixels(x).clamp(-1, 1) + 1) / 2)


@pytest.mark.parametrize("spatial", [False, True])
def test_guidance_scale_one_equals_conditional_prediction(spatial):
    pipe = tiny_pipe(seed=1, spatial_condition=spatial)
    tok = tokens(2, seed=5)
    with torch.no_grad():
        ctx = pipe.conditioner(tok)
        null = pipe.conditioner(pipe.conditioner.null_tokens(2))
        x = torch.randn(pipe.model_space_shape(2), generator=torch.Generator().manual_seed(0))
        t = torch.tensor(500)
        cond = pipe.unet(pipe.conditioner.unet_input(x, ctx), t, encoder_hidden_states=ctx).sample
        uncond = pipe.unet(pipe.conditioner.unet_input(x, null), t, encoder_hidden_states=null).sample
        assert not torch.allclose(cond, uncond, atol=1e-4)  # the condition matters, so the checks below bite
        torch.testing.assert_close(pipe.guided_noise(x, t, ctx, null, 1.0), cond)
        # the batched two-branch path at g=1 is the conditional prediction too
        torch.testing.assert_close(pipe.guided_noise(x, t, ctx, null, 1.0 + 1e-12), cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.guided_noise(x, t, ctx, null, 4.0), uncond + 4.0 * (cond - uncond), atol=1e-5, rtol=1e-4)
    out = pipe(tok, guidance_scale=1.0, num_inference_steps=5, output_type="pt", generator=torch.Generator().manual_seed(9)).images
    torch.testing.assert_close(out, _reference_loop(pipe, ctx, 5, 9), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("spatial", [False, True])
def test_zeroed_condition_is_the_unconditional_branch(spatial):
    pipe = tiny_pipe(seed=2, context_length=N + 3, spatial_condition=spatial)
    zeros = torch.zeros(2, N, D)
    kw = dict(num_inference_steps=5, output_type="pt")
    uncond = _reference_loop(pipe, torch.zeros(2, N + 3, 16), 5, 4)
    for g in (1.0, 7.5):  # guidance cannot move a sample whose condition is the null condition
        out = pipe(zeros, guidance_scale=g, generator=torch.Generator().manual_seed(4), **kw).images
        torch.testing.assert_close(out, uncond, atol=1e-5, rtol=1e-5)
    # in training, a dropped condition feeds the UNet exactly that all-zero context
    model = Denoiser(pipe.unet, pipe.conditioner)
    x = torch.randn(pipe.model_space_shape(2))
    t = torch.tensor([10, 900])
    with torch.no_grad():
        null = torch.zeros(2, N + 3, 16)
        torch.testing.assert_close(model(x, t, zeros), pipe.unet(pipe.conditioner.unet_input(x, null), t, encoder_hidden_states=null).sample)
        if spatial:  # the zero condition adds all-zero channels
            assert pipe.conditioner.unet_input(x, null)[:, x.shape[1]:].abs().max() == 0


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(10, 4, s, seed=0) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(10, 4, 3, seed=0), batch_indices(10, 4, 3, seed=0))


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
    data = toy_data()
    cfg = DecoderTrainConfig(max_steps=6, batch_size=4, warmup_steps=2, checkpoint_every=2, keep_last=2,
                             log_every=1, ema_decay=0.99, cfg_prob=0.3, noise_offset=0.05)

    straight = tiny_pipe()
    set_trainable(straight)
    res = train_loop(straight, data, cfg)
    assert res.steps == 6 and res.resumed_from == 0 and len(res.losses) == 6

    ckpt = tmp_path / "ckpt"
    first = tiny_pipe()
    set_trainable(first)
    part = train_loop(first, data, cfg, ckpt_dir=ckpt, stop_after=4)  # "crash" after step 4
    assert part.steps == 4
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step-00000002", "step-00000004"]
    # a checkpoint cut short (no marker) must be ignored and cleaned up
    step_dir(ckpt, 5).mkdir()
    (step_dir(ckpt, 5) / "state.json").write_bytes(b"partial")

    resumed = tiny_pipe(seed=99)  # a fresh process: different init, everything comes from the checkpoint
    set_trainable(resumed)
    res2 = train_loop(resumed, data, cfg, ckpt_dir=ckpt)
    assert res2.resumed_from == 4 and res2.steps == 6
    assert res2.first_loss == part.first_loss and res2.final_loss == pytest.approx(res.final_loss, rel=1e-5)
    a, b = weights(straight), weights(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step-00000004", "step-00000006"]  # keep_last=2
    assert not step_dir(ckpt, 5).exists()
    assert all((p / COMPLETE).exists() for p in ckpt.glob("step-*"))

    # a rerun after completion trains nothing and returns the recorded losses
    again = tiny_pipe(seed=5)
    set_trainable(again)
    res3 = train_loop(again, data, cfg, ckpt_dir=ckpt)
    assert res3.resumed_from == 6 and res3.final_loss == res2.final_loss


def test_latent_space_with_frozen_unet(tmp_path):
    """The cluster path (SD-1.5 layout: unet/ vae/ scheduler/), on a tiny random stand-in."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    sd = tmp_path / "sd"
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                         cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8).save_pretrained(sd / "unet")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                  sample_size=16).save_pretrained(sd / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", clip_sample=False).save_pretrained(sd / "scheduler")

    cfg = DecoderConfig(pretrained_path=str(sd), train_unet=False, image_size=16, context_length=7)
    pipe = MetaMorphDecoderPipeline.from_decoder_config(cfg, feature_dim=D, n_tokens=N)
    assert pipe.conditioner.config.cross_attention_dim == 24 and pipe.model_space_shape(1) == (1, 4, 8, 8)
    set_trainable(pipe, cfg.train_unet)
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    cond_before = {k: v.clone() for k, v in pipe.conditioner.state_dict().items()}
    train_loop(pipe, toy_data(), DecoderTrainConfig(max_steps=2, batch_size=4, warmup_steps=0, ema_decay=0))
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet_before.items())
    assert any(not torch.equal(v, pipe.conditioner.state_dict()[k]) for k, v in cond_before.items())

    pipe.save_pretrained(tmp_path / "export")
    loaded = MetaMorphDecoderPipeline.from_pretrained(tmp_path / "export")
    assert loaded.vae is not None
    kw = dict(num_inference_steps=3, output_type="pt", guidance_scale=3.0)
    a = pipe(tokens(1), generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded(tokens(1), generator=torch.Generator().manual_seed(1), **kw).images
    assert a.shape == (1, 3, 16, 16) and torch.equal(a, b)


def test_agreement_and_grid():
    from metamorph.world.render import render, sample_scene, with_object

    scene = with_object(sample_scene(np.random.default_rng(1), image_size=32, n_objects=1), 0, colour="green")
    truth, meta = render(scene), {"scene": scene.to_meta()}
    same = reconstruction_agreement([truth], [truth], [meta])
    assert same["colour_agreement"] == 1.0 and same["background_agreement"] == 1.0 and same["object_iou"] == 1.0
    other = reconstruction_agreement([truth], [render(with_object(scene, 0, colour="yellow"))], [meta])
    assert other["colour_agreement"] == 0.0 and other["object_iou"] > 0.8
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    assert reconstruction_agreement([truth], [blank])["colour_agreement"] == 0.0
    grid = image_grid(pair_rows([truth] * 3, [blank] * 3, per_row=2))
    assert grid.size == (2 * 66 + 2, 4 * 66 + 2)


def test_official_conditioner_layout_and_zero_condition():
    """The MetaMorph code's conditioner: Linear(D, H) - LayerNorm(H) - ReLU - Linear(H, C) -
    LayerNorm(C); the all-zero condition still maps to all-zero rows (the CFG baseline)."""
    from torch import nn

    from metamorph.decoder.conditioning import VisionConditioner

    cond = VisionConditioner(feature_dim=12, n_tokens=4, cross_attention_dim=8, context_length=6, hidden_dim=20,
                             layout="official")
    layers = [(n, type(m)) for n, m in cond.named_children()]
    assert layers == [("fc1", nn.Linear), ("fc2", nn.Linear), ("norm1", nn.LayerNorm), ("norm2", nn.LayerNorm)]
    assert (cond.fc1.in_features, cond.fc1.out_features, cond.norm1.normalized_shape) == (12, 20, (20,))
    assert (cond.fc2.in_features, cond.fc2.out_features, cond.norm2.normalized_shape) == (20, 8, (8,))
    tokens = torch.randn(2, 4, 12)
    with torch.no_grad():
        ctx = cond(tokens)
        x = torch.nn.functional.normalize(tokens, dim=-1)
        want = cond.norm2(cond.fc2(torch.relu(cond.norm1(cond.fc1(x)))))
        assert torch.allclose(ctx[:, :4], want)
        assert torch.equal(ctx[:, 4:], torch.zeros(2, 2, 8))  # zero padding to the context length
        # each real row is layer-normed: mean ~0, std ~1 (norm2 starts at weight 1, bias 0)
        assert ctx[:, :4].mean(-1).abs().max() < 1e-5
        assert cond(cond.null_tokens(3)).abs().max() == 0
    with pytest.raises(ValueError, match="layout"):
        VisionConditioner(layout="gelu")


def test_decoder_defaults_are_the_official_conditioner_and_decay():
    from metamorph.decoder.config import DecoderConfig
    from metamorph.decoder.train import DecoderTrainConfig

    assert DecoderConfig().conditioner == "official"
    assert DecoderTrainConfig().weight_decay == 0.01
    with pytest.raises(ValueError, match="decoder.conditioner"):
        DecoderConfig(conditioner="x")


def test_stage_config_rejects_guidance_without_an_unconditional_branch():
    from stages.train_decoder import TrainDecoderConfig

    with pytest.raises(ValueError, match="guidance_scale"):
        TrainDecoderConfig(train=DecoderTrainConfig(cfg_prob=0.0), sampling=SamplingConfig(guidance_scale=3.0))
    TrainDecoderConfig(train=DecoderTrainConfig(cfg_prob=0.0))  # scale 1 (tiny's): no unconditional branch needed
