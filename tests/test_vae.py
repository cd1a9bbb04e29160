"""Our AutoencoderKL against diffusers' on a tiny random config."""
import pytest
import torch

from model.vae import AutoencoderKL, VAEConfig

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            latent_channels=4, norm_num_groups=8)

# CompVis/stable-diffusion-v1-4 vae/config.json as published
SD14_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.2.2", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "out_channels": 3,
    "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def _diffusers_tiny():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2,
                                  up_block_types=["UpDecoderBlock2D"] * 2, **TINY).eval()
    with torch.no_grad():
        # norms start at weight 1 / bias 0; perturb everything so a misplaced norm or bias shows up
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return ref


@pytest.fixture(scope="module")
def pair():
    ref = _diffusers_tiny()
    cfg = VAEConfig.from_dict(dict(ref.config))
    assert cfg == VAEConfig(**TINY, scaling_factor=0.18215)
    with torch.device("meta"):
        ours = AutoencoderKL(cfg)
    # as the checkpoint loader does: meta build, strict assign
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    return ref, ours.eval()


def test_no_buffers():
    assert list(AutoencoderKL(VAEConfig(**TINY)).buffers()) == []


@torch.no_grad()
def test_encode_matches_diffusers(pair):
    ref, ours = pair
    x = torch.randn(2, 3, 32, 24).clamp(-1, 1)
    want = ref.encode(x).latent_dist
    got = ours.encode(x)
    assert got.mean.shape == (2, 4, 16, 12)
    assert (got.mean - want.mean).abs().max() <= 1e-5
    assert (got.logvar - want.logvar).abs().max() <= 1e-5
    assert (got.std - want.std).abs().max() <= 1e-5
    s_ref = want.sample(generator=torch.Generator().manual_seed(7))
    s_ours = got.sample(generator=torch.Generator().manual_seed(7))
    assert (s_ours - s_ref).abs().max() <= 1e-5


@torch.no_grad()
def test_decode_matches_diffusers(pair):
    ref, ours = pair
    z = torch.randn(2, 4, 8, 6)
    want = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 16, 12)
    assert (got - want).abs().max() <= 1e-5


def test_logvar_clamped():
    from model.vae import DiagonalGaussian
    m = torch.zeros(1, 8, 2, 2)
    m[:, 4:] = torch.tensor([-100.0, 100.0, 0.0, 1.0]).view(1, 1, 2, 2)
    post = DiagonalGaussian(m)
    assert post.logvar.min() == -30 and post.logvar.max() == 20
    assert torch.isfinite(post.std).all()


def test_sd14_config():
    assert VAEConfig.from_dict(SD14_VAE_CONFIG) == VAEConfig()
    # the dict current diffusers writes for the same model (all keys, incl. _use_default_values)
    diffusers = pytest.importorskip("diffusers")
    full = dict(diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2,
                                        up_block_types=["UpDecoderBlock2D"] * 2, **TINY).config)
    full.update({k: v for k, v in SD14_VAE_CONFIG.items() if not k.startswith("_")}, norm_num_groups=32)
    assert VAEConfig.from_dict(full) == VAEConfig()
    with torch.device("meta"):
        sd = AutoencoderKL(VAEConfig()).state_dict()
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["decoder.up_blocks.3.resnets.0.conv_shortcut.weight"].shape == (128, 256, 1, 1)


@pytest.mark.parametrize("key,value", [
    ("use_quant_conv", False), ("use_post_quant_conv", False), ("mid_block_add_attention", False),
    ("latents_mean", [0.1] * 4), ("shift_factor", 0.1159), ("act_fn", "relu"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), ("some_new_flag", True),
])
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        VAEConfig.from_dict({**SD14_VAE_CONFIG, key: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 check needs a GPU")
@torch.no_grad()
def test_fp16_cuda(pair):
    ref, ours = pair
    ours16 = AutoencoderKL(ours.config).cuda().half()
    ours16.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3, 32, 32).clamp(-1, 1)
    want = ours.decode(ours.encode(x).mean)
    got = ours16.decode(ours16.encode(x.cuda().half()).mean).float().cpu()
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 2e-2
