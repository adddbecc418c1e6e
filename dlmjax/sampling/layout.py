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


def left_aligned_canvas(config, prompt, prompt_mask, settings, settings_type):
    """The block samplers' canvas: every row's prompt moved to the left end of `settings.max_length` slots, so the
    blocks of all rows sit on the same slots and no key is padding. Checks, before any tracing, that the special
    ids are tokens of the model (`config`, a ModelConfig), that the row fits its context and that the prompt
    leaves something to generate.

    Returns:
      canvas int32[B, T]: each row's prompt (order kept; left or right padding alike), the mask id after it;
      lengths int32[B]: each row's prompt length.
    """
    prompt = check_request(prompt, settings, settings_type)
    name, s = settings_type.__name__, settings
    batch, width = prompt.shape
    for field in ("mask_id", "eos_id", "pad_id"):
        value = getattr(s.tokens, field)
        if value is not None and value >= config.vocab_size:
            raise SettingsError(f"{name}.tokens.{field}={value} is not a token of the model (vocab_size="
                                f"{config.vocab_size}); use an id in [0, {config.vocab_size})", field=field)
    if s.max_length > config.max_seq_len:
        raise SettingsError(f"{name}.max_length={s.max_length} exceeds the model context model.max_seq_len="
                            f"{config.max_seq_len}; use a max_length <= {config.max_seq_len}", field="max_length")
    if width >= s.max_length:
        raise SettingsError(f"the prompt ({width} tokens) leaves nothing to generate within {name}.max_length="
                            f"{s.max_length}; shorten the prompt or raise max_length", field="max_length")
    prompt_mask = mask_like("prompt_mask", prompt_mask, prompt)
    # Real tokens first, in order (a stable sort of the padding flag).
    order = jnp.argsort(~prompt_mask, axis=1, stable=True)
    lengths = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    moved = jnp.take_along_axis(prompt.astype(jnp.int32), order, axis=1)
    moved = jnp.where(jnp.arange(width) < lengths[:, None], moved, jnp.int32(s.tokens.mask_id))
    canvas = jnp.concatenate([moved, jnp.full((batch, s.max_length - width), s.tokens.mask_id, jnp.int32)], axis=1)
    return canvas, lengths


__all__ = ["check_request", "left_aligned_canvas", "mask_like"]
