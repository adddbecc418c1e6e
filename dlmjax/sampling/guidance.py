"""Classifier-free guidance for the masked sampler: one forward over the batch doubled with an unconditional copy."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dlmjax.sampling import validation as check


@dataclasses.dataclass(frozen=True)
class Guidance:
    """Guidance weight `w = cfg_scale` (0 turns it off). With `w > 0` the logits are `u + (w + 1) * (c - u)`,
    where `c` are the conditional logits and `u` those of a copy whose given slots (prompt and suffix: every slot
    that was not [MASK] when sampling began, as LLaDA's `prompt_index`) hold the mask id. Both come from one
    forward over `[2B, ...]`.
    """

    cfg_scale: float = 0.0

    def __post_init__(self):
        check.nonnegative_real("Guidance", "cfg_scale", self.cfg_scale, off="0 turns it off")

    @property
    def on(self) -> bool:
        return self.cfg_scale > 0

    def rows(self, batch: int) -> int:
        """Rows a forward runs for `batch` sampled rows."""
        return 2 * batch if self.on else batch

    def double(self, tokens: jax.Array, given: jax.Array, mask_id: int) -> jax.Array:
        """int32[B, n] -> [2B, n]: the tokens, then the unconditional copy (given slots masked)."""
        if not self.on:
            return tokens
        return jnp.concatenate([tokens, jnp.where(given, jnp.int32(mask_id), tokens)], axis=0)

    def twice(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [2B, ...] for inputs the two copies share (positions, key masks)."""
        return jnp.concatenate([x, x], axis=0) if self.on else x

    def mix(self, logits: jax.Array) -> jax.Array:
        """[2B, n, V] -> [B, n, V]: the guided logits."""
        if not self.on:
            return logits
        batch = logits.shape[0] // 2
        cond, uncond = logits[:batch], logits[batch:]
        return uncond + (self.cfg_scale + 1.0) * (cond - uncond)


__all__ = ["Guidance"]
