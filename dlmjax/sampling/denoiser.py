"""`Denoiser`: the static view of a model that both samplers call, and the one place that knows Dream's shift."""
from __future__ import annotations

import dataclasses

import jax

from dlmjax.config import ModelConfig
from kernels_pallas.masks import Full, Mask
from dlmjax.models.transformer import build_model, init_cache, padded_positions, shift_logits


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """Hashable view of a model for samplers: (params, tokens, key_mask) -> float32 logits [B, L, V],
    position-aligned (logit row i predicts slot i, whatever the architecture).

    Samplers take it as a static argument of `jax.jit` and the parameters as a traced argument, so weights are
    never baked into the compiled program.

    Dream (`model.arch=dream`) predicts token i from hidden state i - 1, its AR heritage. Everything a sampler
    needs to know about that lives here: `align` turns raw logits into position-aligned ones, and `lead` is how
    many slots before a chunk a cached forward must include so that the chunk's first slot gets a prediction.
    Rotary positions count attended tokens only (`cumsum(key_mask) - 1`, as Dream does under padding), so a
    left-padded row computes exactly what the unpadded row computes.
    """

    config: ModelConfig
    mask: Mask = Full()

    @property
    def lead(self) -> int:
        """Slots before a chunk whose raw logits predict the chunk's first slots (1 for Dream, else 0)."""
        return 1 if self.config.arch == "dream" else 0

    def align(self, raw_logits: jax.Array) -> jax.Array:
        """Raw logits of a whole row [B, L, V] -> position-aligned logits (Dream: row i - 1 predicts slot i)."""
        return shift_logits(raw_logits) if self.lead else raw_logits

    def __call__(self, params, tokens, key_mask=None, positions=None):
        if positions is None and key_mask is not None:
            positions = padded_positions(key_mask)
        raw = build_model(self.config, self.mask).apply({"params": params}, tokens, key_mask=key_mask,
                                                        positions=positions)
        return self.align(raw)

    def init_cache(self, batch: int, length: int):
        return init_cache(self.config, batch, length)

    def forward_cached(self, params, tokens, *, positions, key_mask=None, cache, update_cache=False,
                       dense_mask=None, cache_ranges=None):
        """A chunk against the valid cache slots -> (raw logits [B, n, V], cache).

        `cache_ranges` int32[B, R, 2]: the half-open slot ranges each row sees (see `Transformer.__call__`); the
        samplers always pass them, so that with `model.attention_impl=pallas` the cache kernel runs.
        The logits are raw (for Dream, row j predicts slot j + 1): a chunk does not hold the slot before it, so
        the caller forwards `lead` extra slots in front of what it wants predicted.
        """
        return build_model(self.config, self.mask).apply(
            {"params": params}, tokens, positions=positions, key_mask=key_mask, cache=cache,
            update_cache=update_cache, dense_mask=dense_mask, cache_ranges=cache_ranges)


__all__ = ["Denoiser"]
