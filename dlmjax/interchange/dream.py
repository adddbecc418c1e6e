"""Dream checkpoints (Dream-org/Dream-v0-*-7B: a bidirectional Qwen2) <-> dlmjax
`Transformer` with `model.arch dream` (q/k/v biases, grouped-query attention, RMSNorm eps from config.json).

    model.embed_tokens.weight                          [V, D]     -> wte
    model.layers.{i}.input_layernorm.weight            [D]        -> blocks_{i}/attn_norm/weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight     [out, D]   -> blocks_{i}/{q,k,v}_proj/kernel [D, out]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       [out]      -> blocks_{i}/{q,k,v}_proj/bias
    model.layers.{i}.self_attn.o_proj.weight           [D, H*Dh]  -> blocks_{i}/attn_out/kernel
    model.layers.{i}.post_attention_layernorm.weight   [D]        -> blocks_{i}/ff_norm/weight
    model.layers.{i}.mlp.{gate,up}_proj.weight         [F, D]     -> blocks_{i}/{ff_proj,up_proj}/kernel
    model.layers.{i}.mlp.down_proj.weight              [D, F]     -> blocks_{i}/ff_out/kernel
    model.norm.weight                                  [D]        -> ln_f/weight
    lm_head.weight                                     [V, D]     -> ff_out [D, V] (tied: kept verbatim if stored)

The forward returns raw logits: row i predicts token i + 1. Samplers read position i from row i - 1 with
`dlmjax.models.transformer.shift_logits` (re-exported here).
"""
from __future__ import annotations

from dlmjax.config import ModelConfig
from dlmjax.interchange.common import (Entry, get_key, require, token_id, transformer_to_hf,
                                       transformer_to_params)
from dlmjax.interchange.errors import InterchangeError
from dlmjax.models.transformer import shift_logits  # noqa: F401 (re-export: the Dream sampling convention)

ARCHES = ("dream",)
PASSTHROUGH = (r"rotary_emb\.inv_freq$",)


def model_config(hf: dict, arch: str = "dream") -> tuple[ModelConfig, dict]:
    """ModelConfig and meta ({mask_id, eos_id, pad_id, bos_id}) from a Dream (Qwen2) config.json."""
    require(hf, "hidden_act", ("silu",), default="silu")
    require(hf, "rope_scaling", (None,))
    require(hf, "use_sliding_window", (False,), default=False)
    require(hf, "attention_bias", (True,), default=True)  # Qwen2: q/k/v always carry biases
    d_model = get_key(hf, "hidden_size")
    n_heads = get_key(hf, "num_attention_heads")
    n_kv_heads = get_key(hf, "num_key_value_heads", n_heads)
    if d_model % n_heads:
        raise InterchangeError(f"config.json: hidden_size={d_model} is not divisible by num_attention_heads={n_heads}")
    head_dim = get_key(hf, "head_dim", d_model // n_heads)
    if head_dim != d_model // n_heads:
        raise InterchangeError(f"config.json: head_dim={head_dim} is not supported; dlmjax needs hidden_size / "
                               f"num_attention_heads = {d_model // n_heads}")
    if n_heads % n_kv_heads:
        raise InterchangeError(f"config.json: num_key_value_heads={n_kv_heads} must divide "
                               f"num_attention_heads={n_heads}")
    vocab = get_key(hf, "vocab_size")
    tied = get_key(hf, "tie_word_embeddings", False, kind=bool)
    try:
        cfg = ModelConfig(
            arch="dream", qkv_bias=True, vocab_size=vocab, d_model=d_model, n_layers=get_key(hf, "num_hidden_layers"),
            n_heads=n_heads, n_kv_heads=0 if n_kv_heads == n_heads else n_kv_heads,
            mlp_hidden=get_key(hf, "intermediate_size"),
            max_seq_len=get_key(hf, "max_position_embeddings", 2048),
            rope_theta=get_key(hf, "rope_theta", 10000.0, kind=float),
            norm_eps=get_key(hf, "rms_norm_eps", 1e-6, kind=float), tie_embeddings=tied,
            init_std=get_key(hf, "initializer_range", 0.02, kind=float))
    except ValueError as e:
        raise InterchangeError(f"config.json does not give a valid dlmjax model: {e}") from None
    meta = {"mask_id": token_id(hf, "mask_token_id", vocab, required=True),
            "eos_id": token_id(hf, "eos_token_id", vocab), "pad_id": token_id(hf, "pad_token_id", vocab),
            "bos_id": token_id(hf, "bos_token_id", vocab), "shift_logits": True}
    if meta["pad_id"] is not None and meta["pad_id"] == meta["mask_id"]:
        raise InterchangeError(f"config.json: pad_token_id={meta['pad_id']} equals mask_token_id; the mask id must be "
                               "a token of its own")
    return cfg, meta


def entries(cfg: ModelConfig) -> list[Entry]:
    d, f, v = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [Entry("model.embed_tokens.weight", (v, d), ("wte",))]
    for i in range(cfg.n_layers):
        b, p = f"model.layers.{i}.", f"blocks_{i}"
        out += [
            Entry(b + "input_layernorm.weight", (d,), (p, "attn_norm", "weight")),
            Entry(b + "self_attn.q_proj.weight", (q, d), (p, "q_proj", "kernel"), True),
            Entry(b + "self_attn.q_proj.bias", (q,), (p, "q_proj", "bias")),
            Entry(b + "self_attn.k_proj.weight", (kv, d), (p, "k_proj", "kernel"), True),
            Entry(b + "self_attn.k_proj.bias", (kv,), (p, "k_proj", "bias")),
            Entry(b + "self_attn.v_proj.weight", (kv, d), (p, "v_proj", "kernel"), True),
            Entry(b + "self_attn.v_proj.bias", (kv,), (p, "v_proj", "bias")),
            Entry(b + "self_attn.o_proj.weight", (d, q), (p, "attn_out", "kernel"), True),
            Entry(b + "post_attention_layernorm.weight", (d,), (p, "ff_norm", "weight")),
            Entry(b + "mlp.gate_proj.weight", (f, d), (p, "ff_proj", "kernel"), True),
            Entry(b + "mlp.up_proj.weight", (f, d), (p, "up_proj", "kernel"), True),
            Entry(b + "mlp.down_proj.weight", (d, f), (p, "ff_out", "kernel"), True),
        ]
    out.append(Entry("model.norm.weight", (d,), ("ln_f", "weight")))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", (v, d), ("ff_out",), True))
    return out


def to_params(read, names, cfg: ModelConfig, arch: str = "dream") -> tuple[dict, dict]:
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding, which HF re-ties on load).
    passthrough = PASSTHROUGH + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
    return transformer_to_params(entries(cfg), read, names, cfg, passthrough=passthrough, arch=arch)


def to_hf(params, cfg: ModelConfig, arch: str = "dream") -> dict:
    return transformer_to_hf(entries(cfg), params, cfg, arch=arch)


def hf_config(cfg: ModelConfig, meta: dict) -> dict:
    """A Dream config.json for a dlmjax model that did not come from one (a model trained here)."""
    return {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "use_sliding_window": False,
        "sliding_window": None, "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std,
        "mask_token_id": meta.get("mask_id"), "pad_token_id": meta.get("pad_id"),
        "eos_token_id": meta.get("eos_id"), "bos_token_id": meta.get("bos_id"),
        "torch_dtype": cfg.param_dtype, "use_cache": False,
    }
