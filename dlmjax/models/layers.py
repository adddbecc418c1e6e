"""Building blocks of the LLaDA/LLaMA-style transformer: RMSNorm, rotary embeddings, SwiGLU.

Numeric conventions follow the LLaDA reference: RMSNorm normalises in float32,
casts back to the input dtype and only then multiplies by the weight; rotary embeddings rotate q and k in
float32 with the NeoX rotate-half layout.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dense_init(std: float):
    return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
    eps: float = 1e-5
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * scale.astype(x.dtype)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables float32 [B, L, head_dim] for integer positions [B, L] (rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, L, H, Dh] in float32 with cos/sin [B, L, Dh]; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


class Dense(nn.Module):
    """Projection whose kernel [in, out] carries logical axis names; optional bias [out] (zero-initialised,
    on the output axis name), e.g. Qwen2/Dream's q/k/v projections."""

    features: int
    axes: tuple[str, str]
    std: float = 0.02
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(dense_init(self.std), self.axes),
                            (x.shape[-1], self.features), self.param_dtype)
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), self.axes[1:]),
                              (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y
