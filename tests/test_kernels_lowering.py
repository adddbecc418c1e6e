"""kernels_pallas lowers for devices this machine lacks: jax.export to TPU (Mosaic) and CUDA (Triton).

Interpret mode accepts shapes and ops the real compilers reject; these exports run the Mosaic and Triton
lowering rules (block shapes, supported ops) without a device. They cannot run the backend compilers
themselves (Mosaic's and Triton's own passes run at compile time on the device).
"""
import jax
import jax.numpy as jnp
import pytest
from jax import export

import kernels_pallas as kp

# Each target counts its kernels by the custom call the lowering emits.
TARGETS = {
    "tpu": dict(marker="tpu_custom_call", disabled=()),
    "cuda": dict(marker="__gpu$xla.gpu.triton",
                 disabled=(export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),)),
}


def _sds(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _export(platform, fn, *args):
    """The exported module's text; `fn` is fresh per call (jit caches traces per function, not per target)."""
    with kp.lowering_target(platform):
        exported = export.export(jax.jit(fn), platforms=[platform],
                                 disabled_checks=list(TARGETS[platform]["disabled"]))(*args)
    return exported.mlir_module()


def _count_kernels(platform, text):
    return text.count(TARGETS[platform]["marker"])


@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_block_attention_forward_and_backward_lower(platform):
    # Lengths off the tile grid, GQA, key padding and packed segments, the BD3 mask: every kernel input path.
    b, n, h, hkv, dh = 2, 300, 4, 2, 128
    mask = kp.Bd3Training(150, 30)

    def loss(q, k, v, segment_ids, key_mask):
        out = kp.block_attention(q, k, v, mask=mask, segment_ids=segment_ids, key_mask=key_mask)
        return out.astype(jnp.float32).sum()

    grads = lambda *a: jax.grad(loss, argnums=(0, 1, 2))(*a)
    args = (_sds((b, n, h, dh)), _sds((b, n, hkv, dh)), _sds((b, n, hkv, dh)), _sds((b, n), jnp.int32),
            _sds((b, n), jnp.bool_))
    assert _count_kernels(platform, _export(platform, grads, *args)) == 3  # forward, dq, dk/dv

    forward = lambda q, k, v: kp.block_attention(q, k, v, mask=kp.BlockCausal(64))
    assert _count_kernels(platform, _export(platform, forward, *args[:3])) == 1


@pytest.mark.parametrize("platform", sorted(TARGETS))
def test_cached_attention_lowers(platform):
    b, s, lb, h, hkv, dh = 2, 1000, 32, 4, 2, 128  # S not a multiple of the cache tile
    fn = lambda *a: kp.cached_attention(*a)
    args = (_sds((b, lb, h, dh)), _sds((b, s, hkv, dh)), _sds((b, s, hkv, dh)), _sds((b, lb, hkv, dh)),
            _sds((b, lb, hkv, dh)), _sds((b,), jnp.int32))
    assert _count_kernels(platform, _export(platform, fn, *args)) == 1


@pytest.mark.parametrize("platform", sorted(TARGETS))
@pytest.mark.parametrize("lb", [32, 300])
def test_cached_attention_with_ranges_lowers(platform, lb):
    """Two ranges per row (a dual cache over left padding) and a block key mask; lb=300: a prefix cache's long
    chunk, whose keys take several tiles."""
    b, s, h, hkv, dh = 2, 1000, 4, 2, 128
    fn = lambda q, kc, vc, kb, vb, ranges, mask: kp.cached_attention(q, kc, vc, kb, vb, ranges, block_key_mask=mask,
                                                                     block_k=128)
    args = (_sds((b, lb, h, dh)), _sds((b, s, hkv, dh)), _sds((b, s, hkv, dh)), _sds((b, lb, hkv, dh)),
            _sds((b, lb, hkv, dh)), _sds((b, 2, 2), jnp.int32), _sds((b, lb), jnp.bool_))
    assert _count_kernels(platform, _export(platform, fn, *args)) == 1


def test_tpu_rejects_a_head_dim_its_tiling_cannot_take():
    fn = lambda q, k, v: kp.block_attention(q, k, v, mask=kp.Causal())
    x = _sds((1, 256, 2, 64))
    with pytest.raises(ValueError, match=r"head_dim=64 violates the TPU kernels' rule: .* multiple of 128"):
        _export("tpu", fn, x, x, x)
