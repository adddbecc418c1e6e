"""Which implementation runs, with which tiles, and the checks that turn bad shapes into readable errors.

`impl="auto"` follows the target platform (tpu -> "mosaic", gpu -> "triton", anything else -> "xla"). An
explicitly requested kernel that cannot run on the target raises; nothing falls back silently. The target is
`jax.default_backend()` unless a `lowering_target("tpu")` block says otherwise (for `jax.export` to a device
this machine does not have).
"""
from __future__ import annotations

import contextlib
import threading

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

IMPLS = ("auto", "reference", "xla", "mosaic", "triton")
KERNEL_PLATFORM = {"mosaic": "tpu", "triton": "gpu"}
_AUTO = {"tpu": "mosaic", "gpu": "triton"}

# Tile sizes per implementation; arguments override. TPU: big lane-aligned tiles amortise the ~0.35 us grid
# step; GPU: 64 x 64 keeps two bf16 tiles plus the float32 accumulator within shared memory/registers at
# Dh = 128. XLA: the key chunk of the scan.
BLOCK_SIZES = {
    "mosaic": {"block_q": 512, "block_k": 512, "cached_block_q": 256, "cached_block_k": 512},
    "triton": {"block_q": 64, "block_k": 64, "cached_block_q": 64, "cached_block_k": 64},
    "xla": {"block_k": 512},
}

_override = threading.local()


@contextlib.contextmanager
def lowering_target(platform: str):
    """Trace for `platform` ("tpu", "cuda"/"gpu", "cpu") instead of the local backend, e.g. around
    `jax.export.export(jax.jit(f), platforms=["tpu"])` on a CPU machine.

    jit caches traces by function and argument shapes, not by this context: export a fresh function per
    target, or a trace made for one platform is silently reused for the next.
    """
    previous = getattr(_override, "platform", None)
    _override.platform = _normalise(platform)
    try:
        yield
    finally:
        _override.platform = previous


def _normalise(platform: str) -> str:
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def target_platform() -> str:
    return getattr(_override, "platform", None) or _normalise(jax.default_backend())


def resolve_impl(impl: str, interpret) -> tuple[str, bool | pltpu.InterpretParams]:
    """(concrete impl, interpret) or a ValueError that says what to do instead.

    `interpret` is a bool, or for impl="mosaic" a `pltpu.InterpretParams()` (TPU interpret mode: simulated TPU
    memory, out-of-bounds block reads raise, uninitialised scratch reads NaN).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if isinstance(interpret, pltpu.InterpretParams):
        if impl != "mosaic":
            raise ValueError(f"interpret=pltpu.InterpretParams(...) simulates a TPU: it needs impl='mosaic', "
                             f"not {impl!r}")
        return impl, interpret
    interpret = bool(interpret)
    platform = target_platform()
    if impl == "auto":
        if interpret:
            raise ValueError("interpret=True needs an explicit impl='mosaic' or impl='triton' (auto picks by platform)")
        return _AUTO.get(platform, "xla"), False
    if interpret and impl not in KERNEL_PLATFORM:
        raise ValueError(f"interpret=True applies to the Pallas kernels (impl='mosaic' or 'triton'), not impl={impl!r}")
    needed = KERNEL_PLATFORM.get(impl)
    if needed and not interpret and platform != needed:
        raise ValueError(
            f"impl={impl!r} is a {needed.upper()} kernel but the target platform is {platform!r}. Use impl='auto' or "
            f"impl='xla' here, interpret=True to run the kernel in Pallas interpret mode, or "
            f"`with kernels_pallas.lowering_target({needed!r}):` to export it for a device this machine lacks.")
    return impl, interpret


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pow2_at_least(x: int, floor: int = 16) -> int:
    p = floor
    while p < x:
        p *= 2
    return p


def fit_block(impl: str, name: str, requested, length: int) -> int:
    """The tile for one axis: the argument if given, else the table entry shrunk to the (aligned) length."""
    if requested is not None:
        return int(requested)
    table = BLOCK_SIZES[impl][name]
    if impl == "mosaic":
        return min(table, _round_up(length, 128))
    return min(table, _pow2_at_least(length))


def _rule_error(field, value, rule):
    return ValueError(f"{field}={value} violates {rule}")


def check_tiling(impl: str, *, head_dim: int, block_q: int, block_k: int, interpret: bool, q_rows: int = 0):
    """Mosaic's (8, 128) tiling and Triton's power-of-two tensors, checked before lowering.

    Interpret mode runs any tile (tests use small ones); the rules apply to real kernels and to lowering.
    `q_rows`: for cached attention a single q tile equal to the block's rows is always legal.
    """
    for field, value in (("block_q", block_q), ("block_k", block_k)):
        if value <= 0:
            raise _rule_error(field, value, "must be a positive int")
    if interpret is True:  # plain interpret mode; TPU interpret mode (InterpretParams) keeps the Mosaic rules
        return
    if impl == "mosaic":
        if head_dim % 128:
            raise _rule_error("head_dim", head_dim, "the TPU kernels' rule: head_dim must be a multiple of 128 "
                              "(q/k/v tiles are [rows, head_dim] with head_dim on the 128 lanes); use impl='xla' "
                              "for smaller heads")
        if block_k % 128:
            raise _rule_error("block_k", block_k, "the TPU (8, 128) tiling: block_k is a lane dimension of the "
                              "score tile and must be a multiple of 128")
        q_rule = 8 if q_rows else 128
        if block_q % q_rule and block_q != q_rows:
            raise _rule_error("block_q", block_q, f"the TPU (8, 128) tiling: block_q must be a multiple of {q_rule}"
                              + ("" if q_rows else " (it is a lane dimension of the transposed tiles in dk/dv)"))
    if impl == "triton":
        for field, value in (("block_q", block_q), ("block_k", block_k)):
            if value < 16 or value & (value - 1):
                raise _rule_error(field, value, "Triton's rule: tile sizes must be powers of two >= 16")


def check_inputs(q, k, v):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B, Lq, H, Dh] and k, v [B, Lk, Hkv, Dh]; got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {q.shape} and k {k.shape} must agree on batch and head_dim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads H={q.shape[2]} must be a multiple of key/value heads Hkv={k.shape[2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"{name}.dtype={x.dtype} is not supported; use float32 or bfloat16")
