"""Transfer schedules: how many masked slots each denoising step of a block commits."""
from __future__ import annotations

import jax
import jax.numpy as jnp


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
