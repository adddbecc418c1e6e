"""Masking schedules for the absorbing-state forward process.

A schedule is a frozen (hashable) dataclass, so it can be a static argument of `jax.jit`. All methods
are pure jnp functions of `t` (any shape, `t = 0` clean, `t = 1` fully masked) and return the same
shape and dtype (float32 in training, float64 under `jax.enable_x64`):

- `alpha(t)`: probability that a slot is still clean, `alpha(0) ~ 1`, `alpha(1) ~ 0`, non-increasing;
- `dalpha(t)`: its derivative in closed form;
- `mask_prob(t) = 1 - alpha(t)`: what the forward process compares uniforms against;
- `weight(t) = -dalpha(t) / (1 - alpha(t))`: the continuous-time ELBO weight of a masked slot.

Subclasses compute `mask_prob` in whichever algebraically equal form is accurate in float32 (or, for
`LogLinearSchedule`, in the reference's own form, so masks from injected uniforms agree with it).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _check_eps(owner: str, eps: float, upper: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < upper:
        raise ValueError(f"{owner}.eps={eps!r} is not allowed; use a float in [0, {upper})")


class Schedule:
    """Base of all schedules: subclasses give `alpha` and `dalpha`; `mask_prob` and `weight` follow."""

    def alpha(self, t: jax.Array) -> jax.Array:
        raise NotImplementedError

    def dalpha(self, t: jax.Array) -> jax.Array:
        raise NotImplementedError

    def mask_prob(self, t: jax.Array) -> jax.Array:
        return 1.0 - self.alpha(t)

    def weight(self, t: jax.Array) -> jax.Array:
        # mask_prob rather than 1 - alpha: subclasses compute it without the float32 cancellation
        # of 1 - alpha near t = 0, where the weight is largest.
        return -self.dalpha(t) / self.mask_prob(t)


@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
    """MD4's linear schedule: `alpha = (1 - 2 eps)(1 - t) + eps`; weight `1/t` when `eps = 0`.

    md4 uses `eps = 1e-4` to keep `alpha` away from 0 and 1; the default 0 is the textbook `1 - t`.
    """

    eps: float = 0.0

    def __post_init__(self):
        _check_eps("LinearSchedule", self.eps, 0.5)

    def alpha(self, t):
        return (1.0 - 2.0 * self.eps) * (1.0 - t) + self.eps

    def dalpha(self, t):
        return -(1.0 - 2.0 * self.eps) * jnp.ones_like(t)

    def mask_prob(self, t):
        return (1.0 - 2.0 * self.eps) * t + self.eps


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
    """MD4's cosine schedule: `alpha = (1 - 2 eps)(1 - cos(pi/2 (1 - t))) + eps`.

    md4 uses `eps = 1e-4`; the default 0 gives `alpha = 1 - cos(pi/2 (1 - t))`.
    """

    eps: float = 0.0

    def __post_init__(self):
        _check_eps("CosineSchedule", self.eps, 0.5)

    def alpha(self, t):
        return (1.0 - 2.0 * self.eps) * (1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))) + self.eps

    def dalpha(self, t):
        return -(1.0 - 2.0 * self.eps) * 0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))

    def mask_prob(self, t):
        # cos(pi/2 (1 - t)) = sin(pi/2 t), which keeps its precision near t = 0.
        return (1.0 - 2.0 * self.eps) * jnp.sin(0.5 * math.pi * t) + self.eps


@dataclasses.dataclass(frozen=True)
class LogLinearSchedule(Schedule):
    """MDLM's default (kuleshov-group/mdlm: noise_schedule.py, `LogLinearNoise`).

    Total noise `sigma(t) = -log(1 - (1 - eps) t)`, rate `dsigma(t) = (1 - eps) / (1 - (1 - eps) t)`,
    `alpha = exp(-sigma) = 1 - (1 - eps) t`, weight `dsigma / expm1(sigma) = 1/t` exactly.

    `alpha`, `mask_prob` and `weight` follow the reference's float32 path (`log1p`, then
    `1 - exp(-sigma)` and `dsigma / expm1(sigma)`) rather than the simplified formulas, so that masks
    drawn from injected uniforms and per-token losses match it to the last bit that matters.
    """

    eps: float = 1e-3

    def __post_init__(self):
        _check_eps("LogLinearSchedule", self.eps, 1.0)

    def sigma(self, t):
        return -jnp.log1p(-(1.0 - self.eps) * t)

    def dsigma(self, t):
        return (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t)

    def alpha(self, t):
        return jnp.exp(-self.sigma(t))

    def dalpha(self, t):
        return -(1.0 - self.eps) * jnp.ones_like(t)

    def weight(self, t):
        return self.dsigma(t) / jnp.expm1(self.sigma(t))


@dataclasses.dataclass(frozen=True)
class LLaDASchedule(Schedule):
    """LLaDA (ML-GSAI/LLaDA: GUIDELINES.md): mask probability `p = (1 - eps) t + eps`, `t ~ U(0, 1)`.

    `alpha = 1 - p` never reaches 1, so even `t = 0` masks a fraction `eps` (every sequence keeps a
    target). LLaDA's loss divides by `p` (`losses.llada_pretrain_loss`), not by this ELBO `weight`
    `(1 - eps) / p`.
    """

    eps: float = 1e-3

    def __post_init__(self):
        _check_eps("LLaDASchedule", self.eps, 1.0)

    def mask_prob(self, t):
        # The reference computes p directly; 1 - (1 - p) would round differently.
        return (1.0 - self.eps) * t + self.eps

    def alpha(self, t):
        return 1.0 - self.mask_prob(t)

    def dalpha(self, t):
        return -(1.0 - self.eps) * jnp.ones_like(t)


SCHEDULES = {
    "cosine": CosineSchedule,
    "linear": LinearSchedule,
    "llada": LLaDASchedule,
    "loglinear": LogLinearSchedule,
}


def get_schedule(name: str, **kwargs) -> Schedule:
    """The schedule registered as `name` ("cosine", "linear", "llada", "loglinear"), built with `kwargs`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(sorted(SCHEDULES))}")
    cls = SCHEDULES[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"schedule {name!r} has no field(s) {unknown}; allowed: {allowed}")
    return cls(**kwargs)
