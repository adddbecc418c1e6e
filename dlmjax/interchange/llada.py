"""LLaDA checkpoints (GSAI-ML/LLaDA-8B-*) <-> dlmjax `Transformer` (model.arch llada).

dlmjax's parameter names are LLaDA's, so the mapping is a rename plus a transpose of every projection (torch
`Linear` stores `[out, in]`, dlmjax kernels are `[in, out]`):

    model.transformer.wte.weight                       [V, D]   -> wte                 [V, D]
    model.transformer.blocks.{i}.attn_norm.weight      [D]      -> blocks_{i}/attn_norm/weight
    model.transformer.blocks.{i}.{q,k,v}_proj.weight   [out, D] -> blocks_{i}/{q,k,v}_proj/kernel [D, out]
    model.transformer.blocks.{i}.attn_out.weight       [D, D]   -> blocks_{i}/attn_out/kernel
    model.transformer.blocks.{i}.ff_norm.weight        [D]      -> blocks_{i}/ff_norm/weight
    model.transformer.blocks.{i}.{ff_proj,up_proj}.weight [F, D] -> blocks_{i}/{ff_proj,up_proj}/kernel [D, F]
    model.transformer.blocks.{i}.ff_out.weight         [D, F]   -> blocks_{i}/ff_out/kernel [F, D]
    model.transformer.ln_f.weight                      [D]      -> ln_f/weight
    model.transformer.ff_out.weight                    [V, D]   -> ff_out [D, V] (absent when weight_tying)

`ff_proj` is the SwiGLU gate, `up_proj` the up projection, `ff_out` the down projection. The vocabulary is
`embedding_size` (the embedding's rows; OLMo may pad it above `vocab_size`). With `include_qkv_bias` the q/k/v
biases map onto `model.qkv_bias`.
"""
from __future__ import annotations

from dlmjax.config import ModelConfig
from dlmjax.interchange.common import (Entry, get_key, require, token_id, transformer_to_hf,
                                       transformer_to_params)
from dlmjax.interchange.errors import InterchangeError

ARCHES = ("llada",)
PREFIX = "model.transformer."
PASSTHROUGH = (r"rotary_emb\.inv_freq$",)

# config.json keys whose value dlmjax's Transformer fixes: (key, supported values, default when absent).
FIXED = (
    ("block_type", ("llama",), "llama"),
    ("activation_type", ("silu",), "silu"),
    ("layer_norm_type", ("rms",), "rms"),
    ("layer_norm_with_affine", (True,), True),
    ("attention_layer_norm", (False,), False),
    ("bias_for_layer_norm", (False, None), False),
    ("include_bias", (False,), False),
    ("alibi", (False,), False),
    ("rope", (True,), True),
    ("rope_full_precision", (True,), True),
    ("scale_logits", (False,), False),
    ("input_emb_norm", (False,), False),
    ("clip_qkv", (None,), None),
    ("block_group_size", (1,), 1),
)


def model_config(hf: dict, arch: str = "llada") -> tuple[ModelConfig, dict]:
    """ModelConfig and meta ({mask_id, eos_id, pad_id, bos_id}) from a LLaDA config.json."""
    for key, allowed, default in FIXED:
        require(hf, key, allowed, default=default)
    d_model = get_key(hf, "d_model")
    n_heads = get_key(hf, "n_heads")
    n_kv_heads = get_key(hf, "n_kv_heads", None)
    if n_kv_heads is None:
        n_kv_heads = 1 if hf.get("multi_query_attention") else n_heads
    mlp_hidden = get_key(hf, "mlp_hidden_size", None)
    if mlp_hidden is None:
        mlp_hidden = get_key(hf, "mlp_ratio", 4) * d_model
    vocab = get_key(hf, "embedding_size", None) or get_key(hf, "vocab_size")
    if vocab < get_key(hf, "vocab_size", vocab):
        raise InterchangeError(f"config.json: embedding_size={vocab} is smaller than vocab_size={hf['vocab_size']}")
    if d_model % n_heads:
        raise InterchangeError(f"config.json: d_model={d_model} is not divisible by n_heads={n_heads}")
    if n_heads % n_kv_heads:
        raise InterchangeError(f"config.json: n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
    try:
        cfg = ModelConfig(
            arch="llada", vocab_size=vocab, d_model=d_model, n_layers=get_key(hf, "n_layers"), n_heads=n_heads,
            n_kv_heads=0 if n_kv_heads == n_heads else n_kv_heads, mlp_hidden=mlp_hidden,
            max_seq_len=get_key(hf, "max_sequence_length", 4096),
            rope_theta=get_key(hf, "rope_theta", 10000.0, kind=float),
            norm_eps=get_key(hf, "rms_norm_eps", 1e-5, kind=float),
            tie_embeddings=get_key(hf, "weight_tying", False, kind=bool),
            init_std=get_key(hf, "init_std", 0.02, kind=float),
            qkv_bias=get_key(hf, "include_qkv_bias", False, kind=bool))
    except ValueError as e:
        raise InterchangeError(f"config.json does not give a valid dlmjax model: {e}") from None
    meta = {"mask_id": token_id(hf, "mask_token_id", vocab, required=True),
            "eos_id": token_id(hf, "eos_token_id", vocab), "pad_id": token_id(hf, "pad_token_id", vocab),
            "bos_id": token_id(hf, "bos_token_id", vocab)}
    if meta["pad_id"] is not None and meta["pad_id"] == meta["mask_id"]:
        raise InterchangeError(f"config.json: pad_token_id={meta['pad_id']} equals mask_token_id; the mask id must be "
                               "a token of its own")
    return cfg, meta


def entries(cfg: ModelConfig) -> list[Entry]:
    d, f, v = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [Entry(PREFIX + "wte.weight", (v, d), ("wte",))]
    for i in range(cfg.n_layers):
        b, p = f"{PREFIX}blocks.{i}.", f"blocks_{i}"
        out += [
            Entry(b + "attn_norm.weight", (d,), (p, "attn_norm", "weight")),
            Entry(b + "q_proj.weight", (q, d), (p, "q_proj", "kernel"), True),
            Entry(b + "k_proj.weight", (kv, d), (p, "k_proj", "kernel"), True),
            Entry(b + "v_proj.weight", (kv, d), (p, "v_proj", "kernel"), True),
        ]
        if cfg.qkv_bias:
            out += [Entry(b + "q_proj.bias", (q,), (p, "q_proj", "bias")),
                    Entry(b + "k_proj.bias", (kv,), (p, "k_proj", "bias")),
                    Entry(b + "v_proj.bias", (kv,), (p, "v_proj", "bias"))]
        out += [
            Entry(b + "attn_out.weight", (d, q), (p, "attn_out", "kernel"), True),
            Entry(b + "ff_norm.weight", (d,), (p, "ff_norm", "weight")),
            Entry(b + "ff_proj.weight", (f, d), (p, "ff_proj", "kernel"), True),
            Entry(b + "up_proj.weight", (f, d), (p, "up_proj", "kernel"), True),
            Entry(b + "ff_out.weight", (d, f), (p, "ff_out", "kernel"), True),
        ]
    out.append(Entry(PREFIX + "ln_f.weight", (d,), ("ln_f", "weight")))
    if not cfg.tie_embeddings:
        out.append(Entry(PREFIX + "ff_out.weight", (v, d), ("ff_out",), True))
    return out


def to_params(read, names, cfg: ModelConfig, arch: str = "llada") -> tuple[dict, dict]:
    return transformer_to_params(entries(cfg), read, names, cfg, passthrough=PASSTHROUGH, arch=arch)


def to_hf(params, cfg: ModelConfig, arch: str = "llada") -> dict:
    return transformer_to_hf(entries(cfg), params, cfg, arch=arch)


def hf_config(cfg: ModelConfig, meta: dict) -> dict:
    """A LLaDA config.json for a dlmjax model that did not come from one (a model trained here)."""
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
        "activation_type": "silu", "layer_norm_type": "rms", "layer_norm_with_affine": True,
        "attention_layer_norm": False, "bias_for_layer_norm": False, "include_bias": False,
        "include_qkv_bias": cfg.qkv_bias, "alibi": False, "rope": True, "rope_full_precision": True,
        "scale_logits": False, "input_emb_norm": False, "weight_tying": cfg.tie_embeddings,
        "d_model": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.num_kv_heads,
        "mlp_hidden_size": cfg.mlp_hidden, "mlp_ratio": max(1, cfg.mlp_hidden // cfg.d_model),
        "vocab_size": cfg.vocab_size, "embedding_size": cfg.vocab_size, "max_sequence_length": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps, "init_std": cfg.init_std,
        "mask_token_id": meta.get("mask_id"), "eos_token_id": meta.get("eos_id"),
        "pad_token_id": meta.get("pad_id"), "torch_dtype": cfg.param_dtype, "use_cache": False,
    }
