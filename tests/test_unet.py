"""Our hand-written UNet against diffusers' UNet2DConditionModel on tiny random configs."""
from __future__ import annotations

import json

import pytest
import torch

from model.unet import UNet2DConditionModel, UNetConfig
from tests.helpers_unet import diffusers_unet, three_level_unet_config, tiny_unet_config

TOL = 1e-5


class HWRecorder:
    """Records every cross-attention layer whose query grid is `hw`."""

    def __init__(self, hw):
        self.hw = hw
        self.maps = {}

    def wants(self, name, hw):
        return tuple(hw) == tuple(self.hw)

    def record(self, name, probs):
        self.maps[name] = probs


def ours_from(ref, config: dict) -> UNet2DConditionModel:
    model = UNet2DConditionModel(UNetConfig(**config)).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def inputs(config: dict, batch=2, h=8, w=8, tokens=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, config["in_channels"], h, w, generator=g)
    context = torch.randn(batch, tokens, config["cross_attention_dim"], generator=g)
    t = torch.tensor([981, 1])[:batch]  # differ per item, so a wrong broadcast would show
    return sample, t, context


@pytest.mark.parametrize("in_channels", [4, 9])
def test_matches_diffusers_tiny(in_channels):
    cfg = tiny_unet_config(in_channels)
    ref = diffusers_unet(cfg)
    ours = ours_from(ref, cfg)
    sample, t, context = inputs(cfg)
    with torch.no_grad():
        want = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert got.shape == want.shape == (2, 4, 8, 8)
    assert want.abs().mean() > 1e-2  # not trivially zero
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("hw", [(8, 8), (7, 9)])
def test_matches_diffusers_three_levels(hw):
    # odd sizes exercise the upsample-to-skip-size path
    cfg = three_level_unet_config()
    ref = diffusers_unet(cfg, seed=3)
    ours = ours_from(ref, cfg)
    sample, t, context = inputs(cfg, h=hw[0], w=hw[1], seed=1)
    with torch.no_grad():
        want = ref(sample, t, context).sample
        got = ours(sample, t, context)
    assert got.shape == want.shape == (2, 4, *hw)
    assert (got - want).abs().max() <= TOL


def test_timestep_forms():
    cfg = tiny_unet_config()
    ref = diffusers_unet(cfg)
    ours = ours_from(ref, cfg)
    sample, _, context = inputs(cfg)
    with torch.no_grad():
        want = ref(sample, torch.tensor([500, 500]), context).sample
        for t in (500, 500.0, torch.tensor(500), torch.tensor([500]), torch.tensor([500, 500])):
            assert (ours(sample, t, context) - want).abs().max() <= TOL


@pytest.mark.parametrize("make_cfg, hw, expected", [
    (tiny_unet_config, (4, 4), {"mid_block.attentions.0.transformer_blocks.0.attn2"}),
    (tiny_unet_config, (8, 8), {"down_blocks.0.attentions.0.transformer_blocks.0.attn2",
                                "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                "up_blocks.1.attentions.1.transformer_blocks.0.attn2"}),
    (three_level_unet_config, (4, 4), {"down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                       "down_blocks.1.attentions.1.transformer_blocks.0.attn2",
                                       "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
                                       "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
                                       "up_blocks.1.attentions.2.transformer_blocks.0.attn2"}),
])
def test_recorder(make_cfg, hw, expected):
    cfg = make_cfg()
    ref = diffusers_unet(cfg, seed=5)
    ours = ours_from(ref, cfg)
    sample, t, context = inputs(cfg, tokens=7, seed=2)

    # capture each cross-attention's input on the diffusers side, for an independent softmax
    seen = {}

    def hook(name):
        def fn(module, args, kwargs):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])
        return fn

    for name in expected:
        ref.get_submodule(name).register_forward_pre_hook(hook(name), with_kwargs=True)

    recorder = HWRecorder(hw)
    with torch.no_grad():
        want = ref(sample, t, context).sample
        plain = ours(sample, t, context)
        got = ours(sample, t, context, recorder=recorder)
    assert (plain - want).abs().max() <= TOL
    assert (got - want).abs().max() <= TOL
    assert set(recorder.maps) == expected

    for name, probs in recorder.maps.items():
        attn = ref.get_submodule(name)
        heads = attn.heads
        assert probs.shape == (2, heads, hw[0] * hw[1], 7)
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-5, rtol=0)
        x, ctx = seen[name]
        with torch.no_grad():
            q = attn.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)
            k = attn.to_k(ctx).unflatten(-1, (heads, -1)).transpose(1, 2)
            expect = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        assert (probs - expect).abs().max() <= TOL


def test_attention_names_and_no_self_attention_recording():
    model = UNet2DConditionModel(UNetConfig(**tiny_unet_config()))
    recorder = HWRecorder((8, 8))
    asked = []
    recorder.wants = lambda name, hw: asked.append(name) or False
    cfg = tiny_unet_config()
    sample, t, context = inputs(cfg)
    with torch.no_grad():
        model(sample, t, context, recorder=recorder)
    assert asked and all(n.endswith("attn2") for n in asked)
    assert len(asked) == 4  # down0, mid, up1 x2
    assert model.get_submodule(asked[0]).name == asked[0]


def test_meta_build_and_assign_load():
    cfg = tiny_unet_config(9)
    ref = diffusers_unet(cfg)
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig(**cfg))
    assert list(ours.buffers()) == []
    assert ours.num_params == sum(p.numel() for p in ref.parameters())
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    sample, t, context = inputs(cfg)
    with torch.no_grad():
        assert (ours(sample, t, context) - ref(sample, t, context).sample).abs().max() <= TOL


def test_bf16_runs():
    cfg = tiny_unet_config()
    ref = diffusers_unet(cfg)
    ours = ours_from(ref, cfg)
    sample, t, context = inputs(cfg)
    with torch.no_grad():
        want = ours(sample, t, context)
        got = ours.to(torch.bfloat16)(sample.bfloat16(), t, context.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()


# ---- config ---------------------------------------------------------------------------------

SD14_CONFIG_JSON = """{
  "_class_name": "UNet2DConditionModel",
  "_diffusers_version": "0.2.2",
  "act_fn": "silu",
  "attention_head_dim": 8,
  "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false,
  "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1,
  "flip_sin_to_cos": true,
  "freq_shift": 0,
  "in_channels": 4,
  "layers_per_block": 2,
  "mid_block_scale_factor": 1,
  "norm_eps": 1e-05,
  "norm_num_groups": 32,
  "out_channels": 4,
  "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"""


def sd14_diffusers_config() -> dict:
    from diffusers import UNet2DConditionModel as Ref
    with torch.device("meta"):
        return dict(Ref(cross_attention_dim=768, sample_size=64).config)


def test_config_from_sd14_json():
    assert UNetConfig.from_dict(json.loads(SD14_CONFIG_JSON)) == UNetConfig()
    inpaint = dict(json.loads(SD14_CONFIG_JSON), in_channels=9)
    assert UNetConfig.from_dict(inpaint).in_channels == 9


def test_config_round_trip_full_diffusers_config():
    from diffusers import UNet2DConditionModel as Ref
    full = sd14_diffusers_config()
    cfg = UNetConfig.from_dict(json.loads(json.dumps(full)))  # as it would come from config.json
    assert cfg == UNetConfig()
    with torch.device("meta"):
        again = dict(Ref(**cfg.to_dict()).config)
    assert {k: v for k, v in again.items() if not k.startswith("_")} == \
           {k: v for k, v in full.items() if not k.startswith("_")}


def test_config_round_trip_tiny():
    cfg = three_level_unet_config()
    ref = diffusers_unet(cfg)
    ours = UNetConfig.from_dict(ref.config)
    assert {k: ours.to_dict()[k] for k in cfg} == cfg
    assert ours.norm_eps == 1e-5 and ours.flip_sin_to_cos and ours.freq_shift == 0


@pytest.mark.parametrize("key, value", [
    ("use_linear_projection", True),
    ("upcast_attention", True),
    ("class_embed_type", "timestep"),
    ("addition_embed_type", "text_time"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("mid_block_type", None),
    ("time_cond_proj_dim", 256),
    ("cross_attention_dim", [768, 768, 768, 768]),
    ("transformer_layers_per_block", 2),
    ("only_cross_attention", True),
    ("dual_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("conv_in_kernel", 7),
    ("act_fn", "gelu"),
    ("num_attention_heads", 8),
    ("center_input_sample", True),
    ("down_block_types", ["AttnDownBlock2D"] * 4),
    ("some_future_key", 1),
])
def test_config_unsupported_raises(key, value):
    d = dict(json.loads(SD14_CONFIG_JSON), **{key: value})
    with pytest.raises(ValueError) as e:
        UNetConfig.from_dict(d)
    msg = str(e.value)
    assert "\n" not in msg
    assert key in msg and repr(value if not isinstance(value, list) else value[0]) in msg


def test_config_accepts_default_lists():
    d = dict(json.loads(SD14_CONFIG_JSON), only_cross_attention=[False] * 4, transformer_layers_per_block=[1] * 4,
             mid_block_only_cross_attention=False, dropout=0.1)
    assert UNetConfig.from_dict(d) == UNetConfig()


# ---- control protocol: observe or replace attention probabilities and ResNet features ---------------

class DiffusersProbsProcessor:
    """Reference for the control tests: a diffusers attention processor that computes the
    probabilities explicitly and passes them through `edit` (identity when None)."""

    def __init__(self, edit=None):
        self.edit = edit

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        q, k, v = (attn.head_to_batch_dim(t) for t in
                   (attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)))
        probs = attn.get_attention_scores(q, k, None)  # (b * heads, n, m)
        if self.edit is not None:
            probs = self.edit(probs.unflatten(0, (b, -1))).flatten(0, 1)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def swap_batch(x):
    return x.flip(0)  # "replace each branch's map with the other's"


def mix_first(x):
    return 0.5 * x + 0.5 * x[:1]  # "blend every branch's map with branch 0's"


class EditControl:
    """Replaces probabilities / residual features at chosen layers; logs what the UNet offers."""

    def __init__(self, edits):
        self.edits = edits  # name -> function
        self.offered = []

    def wants(self, name, hw):
        self.offered.append((name, tuple(hw)))
        return name in self.edits

    def attention(self, name, probs):
        return self.edits[name](probs)

    def features(self, name, h):
        return self.edits[name](h)


def test_control_replaces_attention_and_features_like_diffusers():
    from model.attention import UNetControl
    cfg = three_level_unet_config()
    ref = diffusers_unet(cfg, seed=7)
    ours = ours_from(ref, cfg)
    sample, t, context = inputs(cfg, tokens=7, seed=4)
    self_name = "up_blocks.1.attentions.1.transformer_blocks.0.attn1"
    cross_name = "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    res_name = "up_blocks.2.resnets.0"
    edits = {self_name: swap_batch, cross_name: mix_first, res_name: lambda h: h[:1].expand_as(h)}

    ref.get_submodule(self_name).set_processor(DiffusersProbsProcessor(swap_batch))
    ref.get_submodule(cross_name).set_processor(DiffusersProbsProcessor(mix_first))
    # the residual branch is conv2's output (dropout is off in eval, output scale 1)
    ref.get_submodule(res_name).conv2.register_forward_hook(lambda m, a, out: out[:1].expand_as(out))
    control = EditControl(edits)
    with torch.no_grad():
        want = ref(sample, t, context).sample
        plain = ours(sample, t, context)
        got = ours(sample, t, context, control=control)
        idle = ours(sample, t, context, control=UNetControl())
    assert (got - want).abs().max() <= TOL
    assert (got - plain).abs().max() > 1e-3  # the edits changed the output
    assert torch.equal(idle, plain)  # the do-nothing control keeps every layer on the fast path

    # every attention layer and ResNet block is offered once, with its grid
    from diffusers.models.attention_processor import Attention as RefAttention
    from diffusers.models.resnet import ResnetBlock2D as RefResnet
    expected = {n for n, m in ref.named_modules() if isinstance(m, (RefAttention, RefResnet))}
    names = [n for n, _ in control.offered]
    assert len(names) == len(set(names)) and set(names) == expected
    grids = dict(control.offered)
    assert grids[self_name] == (4, 4) and grids[cross_name] == (4, 4) and grids[res_name] == (8, 8)


def test_control_observed_self_attention_is_the_softmax():
    cfg = tiny_unet_config()
    ref = diffusers_unet(cfg, seed=2)
    ours = ours_from(ref, cfg)
    sample, t, context = inputs(cfg, tokens=5, seed=3)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    seen = {}
    ref.get_submodule(name).set_processor(DiffusersProbsProcessor(lambda p: seen.setdefault("ref", p)))
    control = EditControl({name: lambda p: seen.setdefault("ours", p)})
    with torch.no_grad():
        want = ref(sample, t, context).sample
        got = ours(sample, t, context, control=control)
    assert (got - want).abs().max() <= TOL
    assert seen["ours"].shape == (2, 2, 64, 64)  # (batch, heads, pixels, pixels)
    assert (seen["ours"] - seen["ref"]).abs().max() <= TOL


def test_control_and_recorder_are_exclusive():
    cfg = tiny_unet_config()
    model = UNet2DConditionModel(UNetConfig(**cfg))
    sample, t, context = inputs(cfg)
    from model.attention import UNetControl
    with pytest.raises(ValueError, match="either control= or recorder="):
        model(sample, t, context, control=UNetControl(), recorder=HWRecorder((8, 8)))
