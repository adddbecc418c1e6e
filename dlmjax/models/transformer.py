"""The LLaDA/LLaMA-style bidirectional transformer (the default dlmjax denoiser; also Dream / Qwen2).

`model.arch=dream` is the same network with biases on q/k/v (`model.qkv_bias`), grouped-query attention and
logits shifted by one position when sampling (hidden state i - 1 predicts token i; `dlmjax.sampling.Denoiser`
applies the shift, the forward returns raw logits).

Pure Flax Linen: `Transformer(config).init(...)` gives an explicit parameter pytree and `.apply(...)` is a
pure function of it. Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`mlp`, `norm`, `layers`) and activations are constrained to (`batch`, `length`, `embed` ...); one rules
table (`mesh.rules`, default `dlmjax.sharding.LOGICAL_RULES`) maps them onto the device mesh.

Parameter names follow the released LLaDA checkpoints (`wte`, `attn_norm`, `q_proj`, ..., `ff_out`, `ln_f`)
so that checkpoint interchange is a rename and a transpose.

KV cache (block diffusion): `Transformer(...)(chunk, positions=..., cache=...)` runs a
chunk of `n` slots against the valid entries of a cache plus the chunk itself and returns `(logits, cache)`. With
`update_cache=True` (PREFILL / COMMIT) the chunk's per-layer K/V are written at `[index, index + n)`; without it
(DENOISE) the cache is returned untouched. K is stored after RoPE: positions are absolute, so a cached key never
needs re-rotating. Without `cache` the call is exactly the uncached forward it always was. Which cache slots a
chunk sees can also come as per-row slot ranges (`cache_ranges`), which is what lets `attention_impl=pallas` run
the cache kernel (`kernels_pallas.cached_attention`) instead of the dense path.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.models.attention import attend_with_cache
from kernels_pallas.masks import Full, Mask
from dlmjax.models.layers import DTYPES, Dense, RMSNorm, apply_rotary, dense_init, rotary_tables

BATCH_LENGTH_EMBED = ("batch", "length", "embed")


class Block(nn.Module):
    """Pre-norm block: x += attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    config: ModelConfig
    mask: Mask = Full()

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, dense_mask, cache_k=None, cache_v=None, segment_ids=None,
                 cache_mask=None, cache_ranges=None):
        """x [B, n, D] -> (x, None), or with `cache_k/v` [B, S, Hkv, Dh] -> (x, (k, v) of the chunk [B, n, Hkv, Dh]).

        With a cache, key_mask/dense_mask describe the chunk and cache_mask/cache_ranges the cache (see
        `attend_with_cache`)."""
        cfg = self.config
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        b, length, _ = x.shape
        # Residual projections start smaller so the residual stream does not grow with depth.
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        proj = lambda n, feat, axes, std=cfg.init_std, bias=False: Dense(  # noqa: E731
            feat, axes, std, dtype, pdt, use_bias=bias, name=n)

        h = RMSNorm(cfg.norm_eps, pdt, name="attn_norm")(x)
        q = proj("q_proj", cfg.n_heads * cfg.head_dim, ("embed", "heads"), bias=cfg.qkv_bias)(h)
        k = proj("k_proj", cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), bias=cfg.qkv_bias)(h)
        v = proj("v_proj", cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"), bias=cfg.qkv_bias)(h)
        q = q.reshape(b, length, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
        q = nn.with_logical_constraint(apply_rotary(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rotary(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        a, chunk_kv = attend_with_cache(q, k, v, mask=self.mask, key_mask=key_mask, dense_mask=dense_mask,
                                        impl=cfg.attention_impl, cache_k=cache_k, cache_v=cache_v,
                                        cache_mask=cache_mask, cache_ranges=cache_ranges, segment_ids=segment_ids)
        a = proj("attn_out", cfg.d_model, ("heads", "embed"), out_std)(a.reshape(b, length, -1))
        x = nn.with_logical_constraint(x + a.astype(x.dtype), BATCH_LENGTH_EMBED)

        h = RMSNorm(cfg.norm_eps, pdt, name="ff_norm")(x)
        gate = proj("ff_proj", cfg.mlp_hidden, ("embed", "mlp"))(h)
        up = proj("up_proj", cfg.mlp_hidden, ("embed", "mlp"))(h)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        x = x + proj("ff_out", cfg.d_model, ("mlp", "embed"), out_std)(hidden).astype(x.dtype)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        self.sow("intermediates", "hidden", x)
        return x, chunk_kv


class Transformer(nn.Module):
    """tokens int32 [B, L] -> logits float32 [B, L, V]."""

    config: ModelConfig
    mask: Mask = Full()

    @nn.compact
    def __call__(self, tokens, *, positions=None, key_mask=None, dense_mask=None, cache=None, update_cache=False,
                 segment_ids=None, cache_ranges=None):
        """
        Args:
          tokens: int32 [B, L].
          positions: int32 [B, L] rotary positions (default 0..L-1). BD3-LM feeds [x_t ; x_0] with the same
            positions on both halves, and left-padded rows may shift theirs. Required with `cache`.
          key_mask: bool [B, L], False on padding keys.
          dense_mask: bool [B or 1, L, L], an arbitrary extra attention mask. With `cache` it is the mask inside
            the chunk (default: bidirectional, BD3's M_BC / M_BD pattern for one block).
          cache: None, or a KV cache from `init_cache` holding `S` slots; the chunk's queries then see the
            cache slots whose `key_mask` is True (and, if given, inside `cache_ranges`) plus the chunk itself (under
            `key_mask` and `dense_mask`).
          update_cache: with `cache`, write this chunk's K/V and key_mask at `[index, index + L)` and advance
            `index` by L. The caller keeps `index + L <= S` (the sampler checks it statically): like every
            `dynamic_update_slice`, an out-of-range write would be clamped, not refused.
          segment_ids: int [B, L], packed rows (`dlmjax.data.packing`): a token attends only to tokens of its own
            segment (ANDed into the mask; passed to the kernels on the pallas path). Pass the per-document
            `positions` with it. Uncached calls only.
          cache_ranges: with `cache`, int32[B, R, 2]: per row, R half-open slot ranges `[lo, hi)` it may see
            (`kernels_pallas.ranges`: e.g. `[[pad, block_start), [block_end, end)]` for a dual cache). The dense path
            ANDs them with the cache's `key_mask`; with `model.attention_impl=pallas*` and no `dense_mask` they are
            the whole description (they must then cover real keys only) and the cache kernel reads only the tiles
            they touch, never an [B, L, S] mask. R = 0: no cache slot is seen (a first pass that only writes).
            None: the cache's `key_mask` alone, on the dense path.
        Returns:
          logits float32 [B, L, V]; with `cache`, the pair (logits, cache).
        """
        cfg = self.config
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        b, length = tokens.shape
        check_cache_arguments(self.mask, cfg, cache=cache, positions=positions, batch=b, length=length,
                              update_cache=update_cache, cache_ranges=cache_ranges, segment_ids=segment_ids)
        wte = self.param("wte", nn.with_logical_partitioning(dense_init(cfg.init_std), ("vocab", "embed")),
                         (cfg.vocab_size, cfg.d_model), pdt)
        x = jnp.take(wte, tokens, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        self.sow("intermediates", "embedding", x)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)

        block_cls = Block
        if cfg.remat:
            block_cls = nn.remat(block_cls, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers and cache is None:
            # One traced block for all layers: compile time independent of depth; params stacked on "layers".
            stack = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                            split_rngs={"params": True}, in_axes=nn.broadcast, length=cfg.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, self.mask, name="blocks")(x, cos, sin, key_mask, dense_mask, None, None, segment_ids)
        elif cfg.scan_layers:
            # Same stacked params; the cache's leading "layers" axis is scanned alongside them.
            stack = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                            split_rngs={"params": True}, length=cfg.n_layers,
                            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast,
                                     nn.broadcast, nn.broadcast),
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, (chunk_k, chunk_v) = stack(cfg, self.mask, name="blocks")(
                x, cos, sin, key_mask, dense_mask, cache["k"], cache["v"], None, cache["key_mask"], cache_ranges)
        elif cache is None:
            for i in range(cfg.n_layers):
                x, _ = block_cls(cfg, self.mask, name=f"blocks_{i}")(x, cos, sin, key_mask, dense_mask, None, None,
                                                                     segment_ids)
        else:
            chunk_kv = []
            for i in range(cfg.n_layers):
                x, kv = block_cls(cfg, self.mask, name=f"blocks_{i}")(
                    x, cos, sin, key_mask, dense_mask, cache["k"][i], cache["v"][i], None, cache["key_mask"],
                    cache_ranges)
                chunk_kv.append(kv)
            chunk_k = jnp.stack([k for k, _ in chunk_kv])
            chunk_v = jnp.stack([v for _, v in chunk_kv])

        x = RMSNorm(cfg.norm_eps, pdt, name="ln_f")(x)
        self.sow("intermediates", "final_norm", x)
        if cfg.tie_embeddings:
            logits = jnp.dot(x, wte.astype(dtype).T, preferred_element_type=jnp.float32)
        else:
            head = self.param("ff_out", nn.with_logical_partitioning(dense_init(cfg.init_std), ("embed", "vocab")),
                              (cfg.d_model, cfg.vocab_size), pdt)
            logits = jnp.dot(x, head.astype(dtype), preferred_element_type=jnp.float32)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
        if cache is None:
            return logits
        if update_cache:
            cache = _write_cache(cache, chunk_k, chunk_v, key_mask)
        return logits, cache


def init_cache(config: ModelConfig, batch: int, length: int):
    """An empty KV cache of `length` slots per row.

    Returns a pytree: `k`, `v` [n_layers, B, S, Hkv, Dh] in the activation dtype (K after RoPE), `index` int32
    scalar (next slot to write; shared by the batch, whose rows are aligned by left padding) and `key_mask`
    bool [B, S] (True on slots holding a real, committed key: per-row lengths and padding live here).
    """
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"init_cache: length={length!r} is not allowed; use an int >= 1 (slots per row)")
    shape = (config.n_layers, batch, length, config.num_kv_heads, config.head_dim)
    dtype = DTYPES[config.dtype]
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.int32(0),
            "key_mask": jnp.zeros((batch, length), bool)}


def check_cache_arguments(mask: Mask, config: ModelConfig, *, cache, positions, batch: int, length: int,
                          update_cache: bool, cache_ranges, segment_ids) -> None:
    """Static checks of a call's cache arguments (every backbone with a KV cache), so a mistake fails with a
    message instead of inside an einsum. An uncached call passes with `cache_ranges` None."""
    if cache is None and not update_cache:
        if cache_ranges is not None:
            raise ValueError("cache_ranges says which cache slots a cached call sees; it needs cache=...")
        return
    if segment_ids is not None:
        raise ValueError("segment_ids (packed training rows) cannot be combined with a KV cache")
    if cache is None:
        raise ValueError("update_cache=True needs a cache; build one with init_cache(config, batch, slots)")
    if positions is None:
        raise ValueError("a cached call needs absolute `positions` [B, L] for the chunk (the cache holds "
                         "post-RoPE keys, so positions cannot default to 0..L-1)")
    if not isinstance(mask, Full):
        raise ValueError(f"Transformer.mask={mask!r} applies to uncached calls only; with a cache pass the "
                         "structure inside the chunk as dense_mask")
    if not isinstance(cache, dict) or set(cache) != {"k", "v", "index", "key_mask"}:
        raise ValueError("cache must be the dict made by init_cache: keys 'k', 'v', 'index', 'key_mask'")
    slots = cache["key_mask"].shape[-1]
    want = (config.n_layers, batch, slots, config.num_kv_heads, config.head_dim)
    if cache["k"].shape != want or cache["v"].shape != want:
        raise ValueError(f"cache k/v must have shape [layers, batch, slots, kv_heads, head_dim] = {list(want)}, "
                         f"got {list(cache['k'].shape)}; build it with init_cache(config, batch, slots)")
    if update_cache and length > slots:
        raise ValueError(f"a chunk of {length} slots cannot fit a cache of {slots} slots; use a larger cache")
    if cache_ranges is not None and (cache_ranges.ndim != 3 or cache_ranges.shape[::2] != (batch, 2)
                                     or not jnp.issubdtype(cache_ranges.dtype, jnp.integer)):
        raise ValueError(f"cache_ranges must be int [batch={batch}, R, 2] half-open slot ranges (lo, hi) per row, "
                         f"got {cache_ranges.dtype}{list(cache_ranges.shape)}")


def _write_cache(cache, chunk_k, chunk_v, key_mask):
    """Writes the chunk's K/V [layers, B, n, Hkv, Dh] and key_mask [B, n] at `index`; advances `index` by n."""
    index = cache["index"]
    n = chunk_k.shape[2]
    if key_mask is None:
        key_mask = jnp.ones(chunk_k.shape[1:3], bool)
    zero = jnp.int32(0)
    at = (zero, zero, index, zero, zero)
    return {
        "k": jax.lax.dynamic_update_slice(cache["k"], chunk_k.astype(cache["k"].dtype), at),
        "v": jax.lax.dynamic_update_slice(cache["v"], chunk_v.astype(cache["v"].dtype), at),
        "index": index + n,
        "key_mask": jax.lax.dynamic_update_slice(cache["key_mask"], key_mask.astype(bool), (zero, index)),
    }


def build_model(config: ModelConfig, mask: Mask = Full()) -> nn.Module:
    """The Flax module for `config.arch`: `Transformer` for llada/dream, `DiT` for dit (same call signature)."""
    if config.arch == "dit":
        from dlmjax.models.dit import DiT  # noqa: PLC0415 (dit imports this module)

        return DiT(config, mask)
    return Transformer(config, mask)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """A fresh parameter pytree (logical-axis metadata stripped)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = build_model(config).init(rng, tokens)
    return nn.unbox(variables["params"])


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


def padded_positions(key_mask: jax.Array) -> jax.Array:
    """Rotary positions int32[B, L] that count real tokens only: `cumsum(key_mask) - 1`, 0 on leading padding."""
    return jnp.clip(jnp.cumsum(key_mask.astype(jnp.int32), axis=1) - 1, 0)


def shift_logits(logits: jax.Array) -> jax.Array:
    """Dream's shifted-logit convention: position i is predicted by raw row i - 1.

    logits [B, L, V] (raw forward output) -> [B, L, V] with `out[:, 0] = logits[:, 0]` and
    `out[:, i] = logits[:, i - 1]` for i >= 1. `dlmjax.sampling.Denoiser.align` applies it for the samplers.
    """
    return jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
