"""Transfer schedules: how many masked slots each denoising step of a block commits."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def transfer_counts(n_masked: jax.Array, steps: int) -> jax.Array:
    """LLaDA's front-loaded transfer table (ML-GSAI/LLaDA: generate.py, `get_num_transfer_tokens`).

    Row `j` spreads its `n_j` masked slots over `S = steps` steps as evenly as integers allow,
    the remainder going to the earliest steps: `k[j, i] = n_j // S + (i < n_j % S)`. For
    `n = 30, S = 8` this is `[4, 4, 4, 4, 4, 4, 3, 3]`; every row sums to `n_j`. (dllm rounds a
    linear schedule instead; the two agree only when `S` divides `n`, ALGORITHMS.md §5.7.)

    Args:
      n_masked: int[batch], number of masked slots per row at the start of the block (>= 0).
      steps: static number of steps `S` in the block (>= 1).

    Returns:
      int32[batch, steps], the number of commits per row and step.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"transfer_counts: steps={steps!r} is not allowed; use a static int >= 1")
    n = jnp.asarray(n_masked).astype(jnp.int32)
    if n.ndim != 1:
        raise ValueError(f"transfer_counts: n_masked must be int[batch], got shape {n.shape}")
    base = n // steps
    remainder = n % steps
    step = jnp.arange(steps, dtype=jnp.int32)
    return base[:, None] + (step[None, :] < remainder[:, None]).astype(jnp.int32)


def dream_transfer_fractions(steps: int, eps: float) -> np.ndarray:
    """Dream's per-step unmasking fraction `1 - s/t`, float32[steps] (the last step is 1: fill everything).

    `t = linspace(1, eps, steps + 1)` is built the way `torch.linspace` builds it in float32 (start + i * step for
    the first half, end - (n - 1 - i) * step for the second), then `1 - s/t` in float32, so that
    `int(n * fraction)` floors exactly where Dream's does (ALGORITHMS.md §4.3: at 32 steps the first step
    commits nothing). Dream commits `int(n * (1 - s/t))` slots at step `i < steps - 1` and all of them at the last.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"dream_transfer_fractions: steps={steps!r} is not allowed; use an int >= 1")
    n = steps + 1
    start, end = np.float32(1.0), np.float32(eps)
    step = (end - start) / np.float32(n - 1) if n > 1 else np.float32(0)
    t = np.empty(n, np.float32)
    for i in range(n):
        t[i] = start + step * np.float32(i) if i < n // 2 else end - step * np.float32(n - 1 - i)
    fractions = (np.float32(1) - t[1:] / t[:-1]).astype(np.float32)
    fractions[-1] = 1.0
    return fractions
