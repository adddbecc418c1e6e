"""The absorbing-state forward process q(x_t | x_0) and the draw of diffusion times.

Randomness enters only through explicit uniforms (`t_from_uniform`, `forward_sample`), so tests and
parity checks can inject the same numbers as the PyTorch references; `sample_t` and `mask_tokens` are
the thin wrappers that draw them from a JAX key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def t_from_uniform(u: jax.Array, eps: float = 1e-3, antithetic: bool = True) -> jax.Array:
    """Diffusion times from given uniforms (kuleshov-group/mdlm: diffusion.py, `_sample_t`).

    With `antithetic`, uniform `i` of `n` is moved into the stratum `[i/n, (i+1)/n)` as
    `(u_i / n + i / n) mod 1` (the reference's float order), which lowers the variance of the batch
    loss. Then `t = (1 - eps) u + eps`, so `t` lies in `[eps, 1]`.

    Args:
      u: f32[n], uniforms in [0, 1).
      eps: smallest time; 0 gives `t = u` (LLaDA draws `t ~ U(0, 1)` and puts eps into `p` instead).
      antithetic: stratify the `n` times over the batch.

    Returns:
      f32[n] times.
    """
    u = jnp.asarray(u, jnp.float32)
    if u.ndim != 1:
        raise ValueError(f"t_from_uniform: u must be f32[n], got shape {u.shape}")
    if antithetic:
        n = u.shape[0]
        offset = jnp.arange(n, dtype=jnp.float32) / n
        # The mod is a no-op in exact arithmetic; kept because the reference applies it after rounding.
        u = jnp.mod(u / n + offset, 1.0)
    return (1.0 - eps) * u + eps


def sample_t(key: jax.Array, n: int, *, eps: float = 1e-3, antithetic: bool = True) -> jax.Array:
    """f32[n] diffusion times in [eps, 1]: `t_from_uniform` on `n` fresh uniforms from `key`."""
    return t_from_uniform(jax.random.uniform(key, (n,), jnp.float32), eps, antithetic)


def forward_sample(
    x0: jax.Array,
    mask_prob: jax.Array,
    u: jax.Array,
    mask_id: int,
    *,
    protect: jax.Array | None = None,
    inclusive: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Mask each slot of `x0` independently: `x_t = mask_id` where `u < mask_prob`.

    The comparison is strict as in MDLM's `q_xt`; `inclusive=True` uses `u <= mask_prob` as BD3-LM
    does. The two differ only at the edge `u == p` (e.g. `p = 0` masks nothing only when strict).

    Args:
      x0: int[B, L] clean tokens.
      mask_prob: float, broadcastable to [B, L]; usually [B, 1] (one time per row) or [B, L].
      u: f32[B, L] uniforms in [0, 1).
      mask_id: token id of the absorbing [MASK] state.
      protect: optional bool[B, L]; True slots are never masked (SFT prompts, padding).
      inclusive: compare with `<=` instead of `<`.

    Returns:
      (xt int[B, L] with the dtype of x0, is_masked bool[B, L]).
    """
    if isinstance(mask_id, int) and mask_id < 0:
        raise ValueError(f"forward_sample: mask_id={mask_id} is not allowed; use a token id >= 0")
    x0, u = jnp.asarray(x0), jnp.asarray(u)
    if u.shape != x0.shape:
        raise ValueError(f"forward_sample: u has shape {u.shape}, x0 has shape {x0.shape}; they must match")
    is_masked = (u <= mask_prob) if inclusive else (u < mask_prob)
    is_masked = jnp.broadcast_to(is_masked, x0.shape)
    if protect is not None:
        is_masked = is_masked & ~protect
    xt = jnp.where(is_masked, jnp.asarray(mask_id, x0.dtype), x0)
    return xt, is_masked


def mask_tokens(
    key: jax.Array,
    x0: jax.Array,
    mask_prob: jax.Array,
    mask_id: int,
    protect: jax.Array | None = None,
    *,
    inclusive: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`forward_sample` with f32[B, L] uniforms drawn from `key`; returns (xt, is_masked)."""
    u = jax.random.uniform(key, x0.shape, jnp.float32)
    return forward_sample(x0, mask_prob, u, mask_id, protect=protect, inclusive=inclusive)
