"""Field checks shared by the sampler settings, special tokens and commit rules.

Each raises `SettingsError` whose message starts with `Owner.field=value` and says what is allowed, and whose
`.field` is the field's name, so a front end can name it in its own terms (`--gen-length`).
"""
from __future__ import annotations

import math

from dlmjax.errors import SettingsError


def is_int(value) -> bool:
    # bool is an int subclass, but `steps=True` is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def fail(owner: str, field: str, value, rule: str):
    raise SettingsError(f"{owner}.{field}={value!r} is not allowed; {rule}", field=field)


def positive_int(owner: str, field: str, value) -> None:
    if not is_int(value) or value < 1:
        fail(owner, field, value, "use an int >= 1")


def optional_token_id(owner: str, field: str, value) -> None:
    """None or an int >= 0 (whether the id is in the vocabulary is checked against the model)."""
    if value is not None and (not is_int(value) or value < 0):
        fail(owner, field, value, "use an int >= 0, or None")


def nonnegative_real(owner: str, field: str, value, *, off: str) -> None:
    if not is_real(value) or not math.isfinite(value) or value < 0:
        fail(owner, field, value, f"use a finite number >= 0 ({off})")


def top_k(owner: str, value) -> None:
    if not is_int(value) or value < 0:
        fail(owner, "top_k", value, "use an int >= 0 (0 turns it off)")


def top_p(owner: str, value) -> None:
    if not is_real(value) or not 0 < value <= 1:
        fail(owner, "top_p", value, "use a number in (0, 1] (1 turns it off)")


def unit_threshold(owner: str, field: str, value) -> None:
    """A confidence threshold in (0, 1]."""
    if not is_real(value) or not math.isfinite(value) or not 0 < value <= 1:
        fail(owner, field, value, "use a number in (0, 1]")


def positive_real(owner: str, field: str, value) -> None:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        fail(owner, field, value, "use a finite number > 0")


def open_unit(owner: str, field: str, value) -> None:
    if not is_real(value) or not 0 < value < 1:
        fail(owner, field, value, "use a number in (0, 1)")


def boolean(owner: str, field: str, value) -> None:
    if not isinstance(value, bool):
        fail(owner, field, value, "use a bool")


def block_grid(owner: str, max_length: int, block_length: int) -> None:
    """Rows of `max_length` slots cut into whole blocks of `block_length` (both already positive ints)."""
    if max_length % block_length:
        divisors = [d for d in range(1, max_length + 1) if max_length % d == 0]
        fail(owner, "max_length", max_length, f"it must be a multiple of block_length={block_length}; choose a "
             f"block_length in {divisors} or a max_length that is a multiple of {block_length}")
