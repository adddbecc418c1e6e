"""The MDLM / BD3-LM diffusion transformer (DiT), `model.arch=dit`.

The network of kuleshov-group/mdlm `models/dit.py` and kuleshov-group/bd3lms `models/dit.py` (`DIT`, `DDiTBlock`,
`DDiTFinalLayer`), written for Flax with the call signature of `dlmjax.models.transformer.Transformer`, so that the
training objectives and the samplers run it unchanged:

    c = SiLU(sigma_map(sigma))                       256 sinusoidal features -> Linear -> SiLU -> Linear
    x = vocab_embed[tokens]
    per block:  shift/scale/gate (msa, mlp) = adaLN_modulation(c)
                x += gate_msa * attn_out(attention(rotary(attn_qkv(LN(x) * (1 + scale_msa) + shift_msa))))
                x += gate_mlp * mlp_2(GELU_tanh(mlp_0(LN(x) * (1 + scale_mlp) + shift_mlp)))
    logits = output_layer.linear(LN(x) * (1 + scale) + shift)          (shift, scale) = output_layer.adaLN(c)

LayerNorm has a learned scale, no bias, eps `norm_eps` (1e-5), and normalises in float32. `adaln=False` (the BD3 HF
wrapper's flag) drops sigma_map and every modulation: the blocks are then plain pre-LN blocks with gates of 1.

Numerics follow the original under its bf16 autocast: LayerNorm, the time embedding and the residual stream are float32
(the reference's residual additions promote to the float32 embedding), matmuls run in `model.dtype`, attention scores
and softmax in float32, logits come out float32. One deliberate difference: rotary embeddings rotate q and k in float32
(the original rotates the bf16 qkv); in float32 the two agree.

`sigma` (float[B]) is used as given; None means zeros. The reference wrappers zero sigma whenever time conditioning is
off (mdlm/bd3lms `_process_sigma`, the BD3 HF backbone), so callers of a `time_conditioning=False` model pass nothing.
Note that sigma = 0 does not switch the modulation off: c = SiLU(sigma_map(0)) comes from the biases.

BD3-LM training (`DiT(cfg, Bd3Training(L, L'))` on `[x_t ; x_0]` with positions 0..L-1 on both halves) is
what the reference computes by rotating each half separately with the same table and masking with `block_diff_mask`.

KV cache: the protocol of `Transformer` (see its module docstring): `init_cache`, K stored after RoPE, `update_cache`
writes the chunk's K/V; with a cache the adaLN conditioning is per row as always, so cached and uncached calls agree.

Parameter names mirror the Hugging Face tensor names (`vocab_embed.embedding`, `sigma_map.mlp.0.weight`,
`blocks.{i}.attn_qkv.weight`, ...): `blocks.{i}` -> `blocks_{i}`, `mlp.{j}` -> `mlp_{j}`, torch
`Linear.weight [out, in]` -> `kernel [in, out]`. `attn_qkv` is stored as `[D, 3, D]` (q, k, v; heads contiguous inside
each), not `[D, 3D]`, so that sharding its last axis over `heads` splits whole heads of q, k and v alike.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlmjax.config import ConfigError, ModelConfig
from dlmjax.models.attention import attend_with_cache
from kernels_pallas.masks import Full, Mask
from dlmjax.models.layers import DTYPES, Dense, apply_rotary, dense_init, rotary_tables
from dlmjax.models.transformer import _write_cache, check_cache_arguments

BATCH_LENGTH_EMBED = ("batch", "length", "embed")
# Sinusoidal features of sigma (`TimestepEmbedder.frequency_embedding_size`) and their period.
TIME_FREQUENCIES = 256
TIME_MAX_PERIOD = 10000.0


def check_dit_config(cfg: ModelConfig) -> None:
    """Model fields the DiT cannot honour, refused with the field, the value and what is allowed."""
    if cfg.arch != "dit":
        raise ConfigError(f"DiT got model.arch={cfg.arch!r}; it implements arch 'dit' (use build_model(config))")
    if cfg.scan_layers:
        raise ConfigError("model.scan_layers=true is not implemented for arch dit; use model.scan_layers=false "
                          "(the DiT's blocks are named blocks_{i}, one per layer, as in its checkpoints)")
    if cfg.num_kv_heads != cfg.n_heads:
        raise ConfigError(f"model.n_kv_heads={cfg.n_kv_heads} is not allowed for arch dit: its attn_qkv has as many "
                          f"key/value heads as query heads; use 0 or {cfg.n_heads}")
    if cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings=true is not allowed for arch dit: its output layer is a separate "
                          "Linear with bias (the original stores tie_word_embeddings but never ties); use false")


class LayerNorm(nn.Module):
    """The DiT's LayerNorm: float32 normalisation, learned scale, no bias (returns float32, as the reference does)."""

    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)  # biased, as torch's layer_norm
        return (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)


def timestep_features(sigma: jax.Array, dim: int = TIME_FREQUENCIES, max_period: float = TIME_MAX_PERIOD):
    """float32[B, dim] = [cos(sigma f_k), sin(sigma f_k)], f_k = exp(-log(max_period) k / (dim/2)), k < dim/2."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(sigma, jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _modulate(x, shift, scale):
    """x * (1 + scale) + shift, x float32 [B, L, D], shift/scale [B, 1, D] (any float dtype): float32 out."""
    return x * (1.0 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)


class Embedding(nn.Module):
    """`EmbeddingLayer`: a raw [V, D] table (`embedding`); looked up rows come out float32 (the residual stream)."""

    vocab_size: int
    features: int
    std: float = 0.02
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        table = self.param("embedding", nn.with_logical_partitioning(dense_init(self.std), ("vocab", "embed")),
                           (self.vocab_size, self.features), self.param_dtype)
        return jnp.take(table, tokens, axis=0).astype(jnp.float32)


class QKVProjection(nn.Module):
    """`attn_qkv` (no bias): kernel [D, 3, H*Dh] -> (q, k, v) each [B, L, H*Dh].

    The reference's Linear(D, 3D) lays its output out as (3, H, Dh); keeping the 3 as its own axis lets `heads`
    shard whole heads of q, k and v (a sharded flat 3D axis would split q from k mid-way).
    """

    features: int
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(dense_init(self.std), ("embed", "qkv", "heads")),
                            (x.shape[-1], 3, self.features), self.param_dtype)
        qkv = jnp.einsum("bld,dtf->tblf", x.astype(self.dtype), kernel.astype(self.dtype))
        return qkv[0], qkv[1], qkv[2]


class OutputLinear(nn.Module):
    """`output_layer.linear`: Linear(D, V) with bias, both zero-initialised (the original); float32 logits."""

    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", "vocab")),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                          (self.features,), self.param_dtype)
        logits = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
        return logits + bias.astype(jnp.float32)


class SigmaMap(nn.Module):
    """`TimestepEmbedder`: sinusoidal features -> Linear(256, C) -> SiLU -> Linear(C, C), in float32."""

    config: ModelConfig

    @nn.compact
    def __call__(self, sigma):
        cfg = self.config
        pdt = DTYPES[cfg.param_dtype]
        h = timestep_features(sigma)
        h = Dense(cfg.cond_dim, ("time_freq", "cond"), cfg.init_std, jnp.float32, pdt, use_bias=True,
                  name="mlp_0")(h)
        h = nn.silu(h)
        return Dense(cfg.cond_dim, ("cond", "cond_out"), cfg.init_std, jnp.float32, pdt, use_bias=True,
                     name="mlp_2")(h)


class DiTBlock(nn.Module):
    """`DDiTBlock`: adaLN-modulated pre-LN attention and GELU(tanh) MLP, each gated."""

    config: ModelConfig
    mask: Mask = Full()

    @nn.compact
    def __call__(self, x, c, cos, sin, key_mask, dense_mask, cache_k=None, cache_v=None, segment_ids=None,
                 cache_mask=None, cache_ranges=None):
        """x float32 [B, n, D], c [B, C] or None -> (x, None), or with `cache_k/v` -> (x, (k, v) of the chunk)."""
        cfg = self.config
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        b, length, d = x.shape
        heads, head_dim = cfg.n_heads, cfg.head_dim

        if cfg.adaln:
            # Zero-initialised, as the original: every block starts as the identity (gates 0).
            mod = Dense(6 * d, ("cond", "modulation"), 0.0, dtype, pdt, use_bias=True, name="adaLN_modulation")(c)
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)

        h = LayerNorm(cfg.norm_eps, pdt, name="norm1")(x)
        if cfg.adaln:
            h = _modulate(h, shift_msa, scale_msa)
        qkv = QKVProjection(heads * head_dim, cfg.init_std, dtype, pdt, name="attn_qkv")(h)
        q, k, v = (part.reshape(b, length, heads, head_dim) for part in qkv)
        q = nn.with_logical_constraint(apply_rotary(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rotary(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        a, chunk_kv = attend_with_cache(q, k, v, mask=self.mask, key_mask=key_mask, dense_mask=dense_mask,
                                        impl=cfg.attention_impl, cache_k=cache_k, cache_v=cache_v,
                                        cache_mask=cache_mask, cache_ranges=cache_ranges, segment_ids=segment_ids)
        a = Dense(d, ("heads", "embed"), cfg.init_std, dtype, pdt, name="attn_out")(a.reshape(b, length, -1))
        # The residual stream stays float32 (the reference adds bf16 branches to its float32 embedding stream).
        x = x + (gate_msa * a if cfg.adaln else a).astype(jnp.float32)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)

        h = LayerNorm(cfg.norm_eps, pdt, name="norm2")(x)
        if cfg.adaln:
            h = _modulate(h, shift_mlp, scale_mlp)
        h = Dense(cfg.mlp_hidden, ("embed", "mlp"), cfg.init_std, dtype, pdt, use_bias=True, name="mlp_0")(h)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("batch", "length", "mlp"))
        h = Dense(d, ("mlp", "embed"), cfg.init_std, dtype, pdt, use_bias=True, name="mlp_2")(h)
        x = x + (gate_mlp * h if cfg.adaln else h).astype(jnp.float32)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        self.sow("intermediates", "hidden", x)
        return x, chunk_kv


class OutputLayer(nn.Module):
    """`DDiTFinalLayer`: LN -> modulate (zero-init adaLN) -> Linear(D, V) with bias (zero-init); float32 logits."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, c):
        cfg = self.config
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        h = LayerNorm(cfg.norm_eps, pdt, name="norm_final")(x)
        if cfg.adaln:
            mod = Dense(2 * cfg.d_model, ("cond", "modulation"), 0.0, dtype, pdt, use_bias=True,
                        name="adaLN_modulation")(c)
            shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
            h = _modulate(h, shift, scale)
        self.sow("intermediates", "final_norm", h)
        return OutputLinear(cfg.vocab_size, dtype, pdt, name="linear")(h)


class DiT(nn.Module):
    """tokens int32 [B, L] (and sigma float[B]) -> logits float32 [B, L, V]; the `Transformer` call signature."""

    config: ModelConfig
    mask: Mask = Full()

    @nn.compact
    def __call__(self, tokens, *, positions=None, key_mask=None, dense_mask=None, cache=None, update_cache=False,
                 sigma=None, segment_ids=None, cache_ranges=None):
        """
        Args:
          tokens, positions, key_mask, dense_mask, cache, update_cache, segment_ids, cache_ranges: as
            `Transformer.__call__`.
          sigma: float[B] noise level fed to the adaLN conditioning, used as given; None means zeros, which is
            what the reference feeds when time conditioning is off. A `time_conditioning=True` model refuses None
            (outside initialisation) rather than silently conditioning on 0.
        Returns:
          logits float32 [B, L, V]; with `cache`, the pair (logits, cache).
        """
        cfg = self.config
        check_dit_config(cfg)
        pdt = DTYPES[cfg.param_dtype]
        b, length = tokens.shape
        check_cache_arguments(self.mask, cfg, cache=cache, positions=positions, batch=b, length=length,
                              update_cache=update_cache, cache_ranges=cache_ranges, segment_ids=segment_ids)

        x = Embedding(cfg.vocab_size, cfg.d_model, cfg.init_std, pdt, name="vocab_embed")(tokens)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        self.sow("intermediates", "embedding", x)

        c = None
        if cfg.adaln:
            if sigma is None:
                if cfg.time_conditioning and not self.is_initializing():
                    raise ValueError("model.time_conditioning=true: the DiT needs sigma float[B]; pass sigma=..., "
                                     "or set model.time_conditioning=false to condition on sigma = 0")
                sigma = jnp.zeros((b,), jnp.float32)
            sigma = jnp.asarray(sigma, jnp.float32)
            if sigma.shape != (b,):
                raise ValueError(f"DiT: sigma must have shape [batch] = [{b}], got {list(sigma.shape)}")
            c = nn.silu(SigmaMap(cfg, name="sigma_map")(sigma))

        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)

        block_cls = nn.remat(DiTBlock) if cfg.remat else DiTBlock
        if cache is None:
            for i in range(cfg.n_layers):
                x, _ = block_cls(cfg, self.mask, name=f"blocks_{i}")(x, c, cos, sin, key_mask, dense_mask, None, None,
                                                                     segment_ids)
        else:
            chunk_kv = []
            for i in range(cfg.n_layers):
                x, kv = block_cls(cfg, self.mask, name=f"blocks_{i}")(
                    x, c, cos, sin, key_mask, dense_mask, cache["k"][i], cache["v"][i], None, cache["key_mask"],
                    cache_ranges)
                chunk_kv.append(kv)

        logits = OutputLayer(cfg, name="output_layer")(x, c)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        if update_cache:
            cache = _write_cache(cache, jnp.stack([k for k, _ in chunk_kv]), jnp.stack([v for _, v in chunk_kv]),
                                 key_mask)
        return logits, cache

