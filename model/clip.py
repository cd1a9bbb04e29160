"""CLIP text transformer, the Stable Diffusion v1.x prompt encoder (OpenAI CLIP ViT-L/14 text tower).

Follows OpenAI CLIP (https://github.com/openai/CLIP/blob/main/clip/model.py) in the module layout of
transformers' ``CLIPTextModel`` (``transformers/models/clip/modeling_clip.py``), minus the
``text_model.`` prefix that the loader strips, so a ``text_encoder/`` state dict loads with
``load_state_dict(strict=True)``. Only ``last_hidden_state`` is produced: SD conditions on every
token, never on the pooled output.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE vocabulary incl. <|startoftext|>, <|endoftext|>
    hidden_size: int = 768  # residual stream width
    intermediate_size: int = 3072  # MLP hidden width
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77  # context length; prompts are always padded to this
    hidden_act: str = "quick_gelu"  # OpenAI's sigmoid GELU approximation; SD 2.x's OpenCLIP uses "gelu"
    layer_norm_eps: float = 1e-5

    # transformers config keys that only matter for training, generation, pooling or bookkeeping
    _IGNORED = {
        "architectures", "transformers_version", "torch_dtype", "dtype", "projection_dim",
        "initializer_range", "initializer_factor", "dropout", "attention_dropout",
        "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
        "output_attentions", "output_hidden_states", "return_dict", "torchscript", "use_bfloat16",
        "tf_legacy_loss", "pruned_heads", "tie_word_embeddings", "chunk_size_feed_forward",
        "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "add_cross_attention",
        "tie_encoder_decoder", "gradient_checkpointing", "finetuning_task", "id2label", "label2id",
        "tokenizer_class", "prefix", "task_specific_params", "problem_type",
        # generation defaults that transformers 4.x serialised into every config
        "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
        "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
        "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
        "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
        "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
        "suppress_tokens", "begin_suppress_tokens",
    }
    _ACTS = ("quick_gelu", "gelu")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTextConfig":
        """Build from a transformers ``text_encoder/config.json`` dict; raise ValueError on settings we don't implement."""
        names = {f.name for f in fields(cls)}
        kw = {}
        for k, v in d.items():
            if k.startswith("_") or k in cls._IGNORED:
                continue
            if k == "model_type":
                if v != "clip_text_model":
                    raise ValueError(f"unsupported text encoder config: {k}={v!r} (only 'clip_text_model')")
            elif k == "hidden_act" and v not in cls._ACTS:
                raise ValueError(f"unsupported text encoder config: {k}={v!r} (only {' or '.join(cls._ACTS)})")
            elif k in names:
                kw[k] = v
            else:
                raise ValueError(f"unknown text encoder config key: {k}={v!r}")
        return cls(**kw)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # positions built per call rather than kept as a buffer: the loader materialises params only
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(pos)


class SelfAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (b, n, h*d) -> (b, h, n, d)
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # causal although SD reads every position: CLIP was trained causal and SD was trained on these
        # features, so no token (padding included) may see the tokens after it
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # (b, h, n, d) -> (b, n, h*d)
        return self.out_proj(out.transpose(1, 2).flatten(2))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = quick_gelu if cfg.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.self_attn = SelfAttention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: CLIPTextConfig | None = None):
        super().__init__()
        self.config = cfg = cfg or CLIPTextConfig()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: (B, n <= max_position_embeddings) int64 -> last_hidden_state (B, n, hidden_size)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens, but the text encoder has only "
                             f"{self.config.max_position_embeddings} positions")
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)
