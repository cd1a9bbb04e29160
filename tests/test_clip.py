"""Our CLIP text encoder against transformers' CLIPTextModel on a tiny random config."""
import pytest
import torch

from model.clip import CLIPTextConfig, CLIPTextModel

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77)

# CompVis/stable-diffusion-v1-4 text_encoder/config.json as published
SD14_TEXT_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408,
}


def _pair(hidden_act):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPTextConfig(**TINY, hidden_act=hidden_act, bos_token_id=998, eos_token_id=999,
                                         pad_token_id=999)
    ref = transformers.CLIPTextModel(hf_cfg).eval()
    with torch.no_grad():
        # LayerNorms start at 1 / 0; perturb so a swapped or missing norm shows up
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k.removeprefix("text_model."): v for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
    cfg = CLIPTextConfig.from_dict(hf_cfg.to_dict())
    assert cfg == CLIPTextConfig(**TINY, hidden_act=hidden_act)
    with torch.device("meta"):
        ours = CLIPTextModel(cfg)
    # as the checkpoint loader does: meta build, strict assign
    ours.load_state_dict(sd, strict=True, assign=True)
    return ref, ours.eval()


def _ids(n=77):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 998, (4, n), generator=g)
    ids[:, 0] = 998
    for row, eos in enumerate([3, 10, n // 2, n - 1]):
        ids[row, eos:] = 999
    return ids


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
@torch.no_grad()
def test_matches_transformers(act):
    ref, ours = _pair(act)
    ids = _ids()
    want = ref(input_ids=ids).last_hidden_state
    got = ours(ids)
    assert got.shape == (4, 77, 32)
    assert (got - want).abs().max() <= 1e-5


@torch.no_grad()
def test_short_sequence_and_causality():
    ref, ours = _pair("quick_gelu")
    ids = _ids(12)
    assert (ours(ids) - ref(input_ids=ids).last_hidden_state).abs().max() <= 1e-5
    # causal: changing a later token leaves earlier positions untouched
    ids2 = ids.clone()
    ids2[:, 8] = 5
    a, b = ours(ids), ours(ids2)
    assert torch.equal(a[:, :8], b[:, :8]) and not torch.allclose(a[:, 8:], b[:, 8:])
    with pytest.raises(ValueError):
        ours(torch.zeros(1, 78, dtype=torch.long))


def test_no_buffers():
    assert list(CLIPTextModel(CLIPTextConfig(**TINY)).buffers()) == []


def test_sd14_config():
    assert CLIPTextConfig.from_dict(SD14_TEXT_CONFIG) == CLIPTextConfig()
    transformers = pytest.importorskip("transformers")
    # what current transformers writes for ViT-L/14's text tower (full dict, generic keys included)
    hf = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                     projection_dim=768)
    assert CLIPTextConfig.from_dict(hf.to_dict()) == CLIPTextConfig()
    with torch.device("meta"):
        sd = CLIPTextModel().state_dict()
    assert sd["embeddings.token_embedding.weight"].shape == (49408, 768)
    assert sd["encoder.layers.11.mlp.fc1.weight"].shape == (3072, 768)


@pytest.mark.parametrize("key,value", [
    ("hidden_act", "relu"), ("model_type", "clip"), ("text_config", {}), ("num_key_value_heads", 4),
])
def test_unsupported_config_raises(key, value):
    with pytest.raises(ValueError, match=key):
        CLIPTextConfig.from_dict({**SD14_TEXT_CONFIG, key: value})
