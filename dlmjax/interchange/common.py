"""Helpers shared by the architecture modules: reading config.json keys with checks, and mapping a table of
(Hugging Face tensor <-> dlmjax parameter) entries in both directions with shape checks."""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from dlmjax.interchange.errors import InterchangeError

REQUIRED = object()
FINITE_CHECK_CHUNK = 1 << 22  # elements per `np.isfinite` pass: a small temporary however large the tensor


def get_key(hf: dict, key: str, default=REQUIRED, *, kind: type | tuple = (int,), where: str = "config.json"):
    """hf[key] checked against `kind` (bools are not ints); a missing key takes `default` or raises."""
    if key not in hf or hf[key] is None:
        if default is REQUIRED:
            raise InterchangeError(f"{where}: key {key!r} is missing; it is required")
        return default
    value = hf[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise InterchangeError(f"{where}: {key}={value!r} has type {type(value).__name__}; expected {names}")
    return value


def require(hf: dict, key: str, allowed: Iterable, *, default=None, where: str = "config.json") -> None:
    """Raise unless hf.get(key, default) is one of `allowed` (the supported values)."""
    value = hf.get(key, default)
    allowed = list(allowed)
    if value not in allowed:
        raise InterchangeError(f"{where}: {key}={value!r} is not supported; supported value(s): {allowed}")


def token_id(hf: dict, key: str, vocab: int, *, required: bool = False, where: str = "config.json"):
    """An int token id in [0, vocab) (or None when absent and not required). Lists take the first entry."""
    value = hf.get(key)
    if isinstance(value, list) and value:
        value = value[0]
    if value is None:
        if required:
            raise InterchangeError(f"{where}: key {key!r} is missing; it is required")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab:
        raise InterchangeError(f"{where}: {key}={value!r} must be a token id in [0, {vocab})")
    return value


def _is_float(dtype: np.dtype) -> bool:
    # bfloat16 and the float8 types (ml_dtypes) are not numpy floating subtypes, but numpy's isfinite handles them
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat", "float"))


def check_finite(name: str, a: np.ndarray, *, arch: str) -> None:
    """Raise InterchangeError if the floating tensor `a` holds a NaN or an infinity (integer tensors pass).

    One pass over the tensor in chunks of `FINITE_CHECK_CHUNK` elements, as it is read: about 0.1 s per 50M
    bfloat16 values on one core, and no full-size temporary.
    """
    if not _is_float(a.dtype) or a.size == 0:
        return
    flat = a.reshape(-1)
    for start in range(0, flat.size, FINITE_CHECK_CHUNK):
        if np.isfinite(flat[start:start + FINITE_CHECK_CHUNK]).all():
            continue
        bad = np.flatnonzero(~np.isfinite(flat))
        first = float(flat[bad[0]])
        raise InterchangeError(f"{arch} checkpoint: tensor {name!r} ({a.dtype}, shape {list(a.shape)}) holds "
                               f"{bad.size} non-finite value(s) (the first, {first}, at flat index {bad[0]}); "
                               f"dlmjax does not import NaN or infinite weights: the checkpoint is damaged")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor and the dlmjax parameter it becomes.

    hf_name, hf_shape: the tensor and its shape in the checkpoint (torch Linear weights are [out, in]).
    path: the parameter's key path in the dlmjax tree, e.g. ("blocks_0", "q_proj", "kernel").
    linear: True when the dlmjax array is the transpose ([in, out] kernels).
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    linear: bool = False

    @property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.hf_shape)) if self.linear else self.hf_shape


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: Sequence[str]):
    for key in path:
        tree = tree[key]
    return tree


def tensors_to_params(entries: Sequence[Entry], read: Callable[[str], np.ndarray], names: Iterable[str], *,
                      passthrough: Sequence[str] = (), arch: str) -> tuple[dict, dict]:
    """Apply an entry table: (params tree, passthrough {name: array}).

    Every entry's tensor must exist with its shape; a checkpoint tensor that no entry maps is an error unless it
    matches one of the `passthrough` regular expressions (buffers such as rotary `inv_freq`, kept verbatim for
    export). Arrays are views where possible (a transpose of a mapped file); the caller copies them onto devices.
    Each floating tensor is checked for NaN / infinity as it is read (`check_finite`).
    """
    names = list(names)
    present = set(names)
    mapped = {e.hf_name for e in entries}
    params: dict = {}
    for e in entries:
        if e.hf_name not in present:
            raise InterchangeError(f"{arch} checkpoint: tensor {e.hf_name!r} is missing (expected shape "
                                   f"{list(e.hf_shape)})")
        a = read(e.hf_name)
        if tuple(a.shape) != e.hf_shape:
            raise InterchangeError(f"{arch} checkpoint: tensor {e.hf_name!r} has shape {list(a.shape)}; expected "
                                   f"{list(e.hf_shape)} from config.json")
        check_finite(e.hf_name, a, arch=arch)
        _set(params, e.path, a.T if e.linear else a)
    extra = {}
    for name in names:
        if name in mapped:
            continue
        if any(re.search(p, name) for p in passthrough):
            extra[name] = np.array(read(name))
            check_finite(name, extra[name], arch=arch)
            continue
        shape = list(read(name).shape)
        raise InterchangeError(f"{arch} checkpoint: unexpected tensor {name!r} with shape {shape}: no dlmjax "
                               f"parameter maps to it (is --arch {arch} the right architecture?)")
    return params, extra


def params_to_tensors(entries: Sequence[Entry], params: dict, *, arch: str) -> dict[str, np.ndarray]:
    """The inverse of `tensors_to_params`: {hf_name: array in the Hugging Face layout}."""
    out = {}
    for e in entries:
        try:
            a = _get(params, e.path)
        except (KeyError, TypeError):
            raise InterchangeError(f"{arch} export: parameter {'/'.join(e.path)} is missing (it becomes "
                                   f"{e.hf_name!r}, shape {list(e.hf_shape)})") from None
        a = np.asarray(a)
        if tuple(a.shape) != e.param_shape:
            raise InterchangeError(f"{arch} export: parameter {'/'.join(e.path)} has shape {list(a.shape)}; expected "
                                   f"{list(e.param_shape)} (for {e.hf_name!r})")
        out[e.hf_name] = a.T if e.linear else a
    return out


def stack_layers(params: dict, n_layers: int) -> dict:
    """blocks_0..blocks_{n-1} -> one "blocks" subtree with a leading layer axis (the `scan_layers` layout)."""
    import jax  # noqa: PLC0415

    blocks = [params.pop(f"blocks_{i}") for i in range(n_layers)]
    params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return params


def unstack_layers(params: dict, n_layers: int) -> dict:
    """The inverse of `stack_layers` (a shallow copy; the input is not modified)."""
    import jax  # noqa: PLC0415

    params = dict(params)
    stacked = params.pop("blocks")
    for i in range(n_layers):
        params[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x)[i], stacked)
    return params


def transformer_to_params(entries: Sequence[Entry], read, names, cfg, *, passthrough, arch: str):
    """`to_params` of the Transformer families (llada, dream): map every tensor, then stack the layers when
    the model scans over them."""
    params, extra = tensors_to_params(entries, read, names, passthrough=passthrough, arch=arch)
    return (stack_layers(params, cfg.n_layers) if cfg.scan_layers else params), extra


def transformer_to_hf(entries: Sequence[Entry], params: dict, cfg, *, arch: str) -> dict[str, np.ndarray]:
    """`to_hf` of the Transformer families: unstack scanned layers, then map every parameter back."""
    if cfg.scan_layers:
        params = unstack_layers(params, cfg.n_layers)
    return params_to_tensors(entries, params, arch=arch)
