"""The request both samplers take: int[B, W] prompts, left-padded, with a `prompt_mask` (True on real tokens)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dlmjax.errors import SettingsError


def check_request(prompt, settings, settings_type) -> jax.Array:
    """The static checks every sampler makes before tracing: the settings' type and an int[B, W] prompt."""
    if not isinstance(settings, settings_type):
        raise TypeError(f"settings must be a {settings_type.__name__}, got {type(settings).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise SettingsError(f"prompt must be int[batch, prompt_length], got {prompt.dtype}{list(prompt.shape)}",
                            field="prompt")
    return prompt


def mask_like(name: str, mask, tokens: jax.Array) -> jax.Array:
    """`mask` as bool of `tokens`' shape (default all True: every slot is a real token)."""
    if mask is None:
        return jnp.ones(tokens.shape, bool)
    mask = jnp.asarray(mask)
    if mask.shape != tokens.shape:
        what = name.removesuffix("_mask")
        raise SettingsError(f"{name} must have the {what}'s shape {list(tokens.shape)}, got {list(mask.shape)}",
                            field=name)
    return mask.astype(bool)


__all__ = ["check_request", "mask_like"]
