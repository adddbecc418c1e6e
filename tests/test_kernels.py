"""kernels_pallas: the Pallas kernels (interpret mode on CPU) and the XLA path held equal to the dense reference,
outputs and gradients; the tile map against dense masks and closed forms; dispatch errors."""
from pathlib import Path

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import masks, reference

GOLDEN_MASK = Path(__file__).parent / "golden" / "tiny_bd3lm" / "attn_mask_L16_block4.npy"
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _inputs(b, lq, lk, h, hkv, dh, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, lq, h, dh), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, lk, hkv, dh), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, lk, hkv, dh), jnp.float32).astype(dtype)
    cotangent = jax.random.normal(ks[3], (b, lq, h, dh), jnp.float32).astype(dtype)
    return q, k, v, cotangent


def _out_and_grads(fn, q, k, v, cotangent):
    """(out, (dq, dk, dv)) of `fn` in one jitted call (one compile per case keeps interpret tests quick)."""

    @jax.jit
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return run(q, k, v, cotangent)


def _assert_close(got, want, dtype):
    got, want = np.asarray(jnp.asarray(got, jnp.float32)), np.asarray(jnp.asarray(want, jnp.float32))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, **TOL[dtype])


def _check_against_reference(impl, mask, shape, dtype, *, segment_ids=None, key_mask=None, **kw):
    b, lq, lk, h, hkv, dh = shape
    q, k, v, ct = _inputs(b, lq, lk, h, hkv, dh, dtype)
    fast = lambda q, k, v: kp.block_attention(q, k, v, mask=mask, segment_ids=segment_ids, key_mask=key_mask,
                                              impl=impl, **kw)
    # The reference sees float32 copies: it is the exact answer the bfloat16 kernel approximates.
    f32 = lambda x: x.astype(jnp.float32)
    slow = lambda q, k, v: reference.block_attention(q, k, v, mask=mask, segment_ids=segment_ids, key_mask=key_mask)
    out, grads = _out_and_grads(fast, q, k, v, ct)
    want_out, want_grads = _out_and_grads(slow, f32(q), f32(k), f32(v), f32(ct))
    _assert_close(out, want_out, dtype)
    for got, want in zip(grads, want_grads):
        _assert_close(got, want, dtype)
    return out, grads


# (mask, (B, Lq, Lk, H, Hkv, Dh), dtype, block_q, block_k, extras): lengths off the tile grid, GQA, both dtypes.
def _segments(b, n):
    seg = np.zeros((b, n), np.int32)
    seg[0, n // 3:] = 1
    seg[0, 2 * n // 3:] = 7
    seg[-1, n // 2:] = 3
    return jnp.asarray(seg)


def _key_mask(b, n, valid):
    return jnp.arange(n)[None, :] < jnp.asarray(valid)[:, None]


KERNEL_CASES = {
    "block_causal_gqa_ragged": (kp.BlockCausal(4), (2, 37, 37, 4, 2, 16), jnp.float32, 8, 16, {}),
    "bd3": (kp.Bd3Training(16, 4), (1, 32, 32, 2, 2, 16), jnp.float32, 8, 8, {}),
    "causal_key_pad_empty_rows": (kp.Causal(), (2, 24, 24, 2, 1, 16), jnp.float32, 16, 8,
                                  {"key_mask": jnp.arange(24)[None, :] >= jnp.array([[3], [0]])}),
    "full_segments_bf16": (kp.Full(), (2, 29, 29, 2, 2, 16), jnp.bfloat16, 8, 8, {"segment_ids": _segments(2, 29)}),
    "cross_lengths": (kp.Full(), (1, 12, 40, 2, 2, 16), jnp.float32, 8, 16, {}),
}


@pytest.mark.parametrize("impl", ["mosaic", "triton"])
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_reference(impl, case):
    mask, shape, dtype, bq, bk, extras = KERNEL_CASES[case]
    out, (dq, _, _) = _check_against_reference(impl, mask, shape, dtype, block_q=bq, block_k=bk, interpret=True,
                                               **extras)
    if case == "causal_key_pad_empty_rows":
        # Causal mask + the first 3 keys padded: queries 0..2 of row 0 see nothing -> exactly 0, not NaN.
        assert np.all(np.asarray(out)[0, :3] == 0) and np.all(np.asarray(dq)[0, :3] == 0)
        assert np.abs(np.asarray(out)[0, 3:]).sum() > 0


@pytest.mark.parametrize("mask,extras", [
    (kp.Bd3Training(12, 4), {}),
    (kp.BlockCausal(5), {"key_mask": _key_mask(2, 24, [20, 24]), "segment_ids": _segments(2, 24)}),
])
def test_xla_matches_reference(mask, extras):
    # block_k=7: the key chunk divides nothing, so the scan's padded last chunk is exercised.
    _check_against_reference("xla", mask, (2, 24, 24, 4, 2, 16), jnp.float32, block_k=7, **extras)


def _largest_intermediate(fn, *args) -> int:
    """Elements of the largest value in fn's jaxpr, looking inside scans, custom_vjp bodies and conds."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                yield int(np.prod(getattr(var.aval, "shape", ())))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        yield from walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        yield from walk(sub)

    return max(walk(jax.make_jaxpr(fn)(*args).jaxpr))


@pytest.mark.parametrize("impl,limit", [("xla", "below"), ("reference", "at least")])
def test_xla_never_builds_a_length_squared_array(impl, limit):
    # The reference twin is the control: it does build [.., L, L], so the walker is seen to find such arrays.
    n = 2048
    x = jax.ShapeDtypeStruct((1, n, 2, 16), jnp.float32)
    fn = lambda q, k, v: kp.block_attention(q, k, v, mask=kp.BlockCausal(64), impl=impl, block_k=256).sum()
    largest = _largest_intermediate(jax.grad(fn, argnums=(0, 1, 2)), x, x, x)
    assert (largest < n * n) if limit == "below" else (largest >= n * n)


# ------------------------------------------------------------------------------------------- masks and tile map


def test_bd3_mask_matches_golden_and_dense_rule():
    golden = np.load(GOLDEN_MASK)
    np.testing.assert_array_equal(kp.Bd3Training(16, 4).dense(32, 32), golden)


def _tile_map_by_brute_force(mask, q_len, kv_len, bq, bk):
    dense = mask.dense(q_len, kv_len)
    out = np.zeros((-(-q_len // bq), -(-kv_len // bk)), np.int8)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            tile = dense[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            full = tile.all() and (j + 1) * bk <= kv_len
            out[i, j] = masks.FULL if full else masks.PARTIAL if tile.any() else masks.EMPTY
    return out


@pytest.mark.parametrize("mask", [kp.Full(), kp.Causal(), kp.Causal(3), kp.BlockCausal(4), kp.BlockCausal(5),
                                  kp.Bd3Training(16, 4), kp.Bd3Training(12, 3)])
def test_tile_map_matches_dense_mask(mask):
    for q_len, kv_len in [(32, 32), (37, 29), (24, 40)]:
        if isinstance(mask, kp.Bd3Training):
            q_len = kv_len = 2 * mask.length
        for bq in (1, 3, 8, 16):
            for bk in (1, 5, 8, 16):
                np.testing.assert_array_equal(kp.tile_map(mask, q_len, kv_len, bq, bk),
                                              _tile_map_by_brute_force(mask, q_len, kv_len, bq, bk))


@pytest.mark.parametrize("length,block,tile", [(1024, 128, 64), (1024, 128, 128), (4096, 64, 256), (32768, 1024, 512)])
def test_block_causal_skipped_fraction_closed_form(length, block, tile):
    got = kp.skipped_fraction(kp.BlockCausal(block), length, length, tile, tile)
    if tile <= block:  # nb blocks of (block/tile)^2 tiles each: the lower block triangle survives
        nb = length // block
        want = 1 - (nb + 1) / (2 * nb)
    else:  # tiles hold whole blocks: the tile-level causal triangle survives
        n = length // tile
        want = (n - 1) / (2 * n)
    assert got == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("length,block", [(1024, 64), (16384, 512)])
def test_bd3_skipped_fraction_closed_form(length, block):
    # Tiles of one block over [x_t ; x_0]: nb diagonal + nb(nb-1)/2 offset + nb(nb+1)/2 causal of 4 nb^2 tiles.
    nb = length // block
    got = kp.skipped_fraction(kp.Bd3Training(length, block), 2 * length, 2 * length, block, block)
    assert got == pytest.approx((3 * nb - 1) / (4 * nb), abs=1e-12)


def test_compacted_lists_skip_empty_tiles_and_repeat_the_last_index():
    tmap = kp.tile_map(kp.BlockCausal(8), 32, 32, 8, 8)
    index, kind, count = masks.compact_tiles(tmap)
    np.testing.assert_array_equal(count, [1, 2, 3, 4])
    np.testing.assert_array_equal(index[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(kind[1], [masks.FULL, masks.FULL, masks.EMPTY, masks.EMPTY])


# ------------------------------------------------------------------------------------------- cached attention


@pytest.mark.parametrize("impl,kw", [("xla", {"block_k": 16}), ("mosaic", {"block_k": 16, "interpret": True}),
                                     ("triton", {"block_k": 16, "block_q": 16, "interpret": True})])
def test_cached_attention_matches_reference(impl, kw):
    b, s, lb, h, hkv, dh = 3, 40, 8, 4, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(3), 5)
    q = jax.random.normal(ks[0], (b, lb, h, dh))
    k_cache, v_cache = (jax.random.normal(key, (b, s, hkv, dh)) for key in ks[1:3])
    k_block, v_block = (jax.random.normal(key, (b, lb, hkv, dh)) for key in ks[3:5])
    lengths = jnp.array([0, 23, 40])  # empty cache, mid-tile ragged end, full cache
    got = jax.jit(lambda *a: kp.cached_attention(*a, impl=impl, **kw))(q, k_cache, v_cache, k_block, v_block, lengths)
    want = jax.jit(reference.cached_attention)(q, k_cache, v_cache, k_block, v_block, lengths)
    _assert_close(got, want, jnp.float32)


def _random_ranges(rng, b, s, r):
    """int32[B, R, 2]: random pairs in [-2, S + 2], any order; some empty (lo >= hi), overlapping or in one tile."""
    return rng.integers(-2, s + 3, size=(b, r, 2)).astype(np.int32)


def _poison_outside(x, cache_ranges):
    """x [B, S, Hkv, Dh] with NaN in every slot outside the row's ranges."""
    seen = np.asarray(kp.ranges.slot_mask(jnp.asarray(cache_ranges), x.shape[1]))
    return jnp.where(seen[:, :, None, None], x, jnp.nan)


@pytest.mark.parametrize("impl,kw", [("xla", {"block_k": 16}), ("mosaic", {"block_k": 8, "interpret": True}),
                                     ("triton", {"block_k": 16, "block_q": 16, "interpret": True})])
def test_cached_attention_ranges_match_reference(impl, kw):
    """Per-row ranges (dual-cache shapes, left padding, random pairs), a padded block and a block longer than a
    cache tile; NaN in every hidden cache slot changes nothing."""
    b, s, lb, h, hkv, dh = 6, 45, 20, 4, 2, 16
    ks = jax.random.split(jax.random.PRNGKey(5), 5)
    q = jax.random.normal(ks[0], (b, lb, h, dh))
    k_cache, v_cache = (jax.random.normal(key, (b, s, hkv, dh)) for key in ks[1:3])
    k_block, v_block = (jax.random.normal(key, (b, lb, hkv, dh)) for key in ks[3:5])
    cache_ranges = np.concatenate([
        np.asarray([[[3, 17], [21, 45]],    # dual cache: left padding 3, block [17, 21) hidden inside one tile
                    [[0, 40], [40, 45]],    # touching ranges
                    [[30, 45], [2, 9]]]),   # any order
        _random_ranges(np.random.default_rng(0), 3, s, 2)])
    block_key_mask = jnp.ones((b, lb), bool).at[1, 15:].set(False)  # a right-padded chunk (suffix padding)
    f = jax.jit(lambda *a: kp.cached_attention(*a[:6], block_key_mask=a[6], impl=impl, **kw))
    want = jax.jit(reference.cached_attention)(q, k_cache, v_cache, k_block, v_block, cache_ranges, block_key_mask)
    got = f(q, k_cache, v_cache, k_block, v_block, cache_ranges, block_key_mask)
    _assert_close(got, want, jnp.float32)
    poisoned = f(q, _poison_outside(k_cache, cache_ranges), _poison_outside(v_cache, cache_ranges), k_block, v_block,
                 cache_ranges, block_key_mask)
    np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(got))


def test_cached_attention_prefix_lengths_are_one_range():
    b, s, lb, h, dh = 2, 20, 4, 2, 8
    q, k, v, _ = _inputs(b, lb, s, h, h, dh, jnp.float32)
    lengths = jnp.asarray([7, 20])
    by_length = kp.cached_attention(q, k, v, k[:, :lb], v[:, :lb], lengths, impl="reference")
    by_range = kp.cached_attention(q, k, v, k[:, :lb], v[:, :lb], jnp.stack([0 * lengths, lengths], -1)[:, None],
                                   impl="reference")
    np.testing.assert_array_equal(np.asarray(by_length), np.asarray(by_range))
    with pytest.raises(ValueError, match=r"cache_ranges \(2, 3\) must be \[B, R, 2\]"):
        kp.cached_attention(q, k, v, k[:, :lb], v[:, :lb], jnp.zeros((2, 3), jnp.int32), impl="reference")


@pytest.mark.parametrize("block_k", [1, 4, 16])
def test_visit_plan_lists_exactly_the_tiles_holding_a_visible_slot(block_k):
    rng = np.random.default_rng(block_k)
    s, n_ranges = 37, 3
    cache_ranges = _random_ranges(rng, 64, s, n_ranges)
    n_tiles = -(-s // block_k)
    lo, hi = kp.ranges.normalize(jnp.asarray(cache_ranges), s)
    tiles, kinds, counts = (np.asarray(x) for x in kp.ranges.visit_plan(lo, hi, block_k, n_tiles))
    seen = np.asarray(kp.ranges.slot_mask(jnp.asarray(cache_ranges), s))
    for row in range(len(cache_ranges)):
        want_seen = np.zeros(s, bool)
        for a, z in cache_ranges[row]:
            want_seen[max(a, 0):max(min(z, s), 0)] = True
        np.testing.assert_array_equal(seen[row], want_seen)
        padded = np.concatenate([want_seen, np.zeros(n_tiles * block_k - s, bool)]).reshape(n_tiles, block_k)
        touched = np.flatnonzero(padded.any(axis=1))
        n = len(touched)
        assert counts[row] == n
        np.testing.assert_array_equal(tiles[row, :n], touched)
        # FULL (no mask arithmetic) where one range covers the tile; a tile covered only by two ranges together
        # stays PARTIAL (exact either way).
        covered = np.asarray([any(a <= t * block_k and (t + 1) * block_k <= min(z, s) for a, z in cache_ranges[row])
                              for t in touched], bool)
        np.testing.assert_array_equal(kinds[row, :n], np.where(covered, masks.FULL, masks.PARTIAL))
        # Past the count: the last visited tile again (no new DMA on TPU), nothing to compute.
        assert (tiles[row, n:] == (touched[-1] if n else 0)).all() and (kinds[row, n:] == masks.EMPTY).all()


# --------------------------------------------------------------------------------------- the model adapter


def test_attention_for_model_matches_dlmjax_attention():
    from dlmjax.models.attention import attention
    from kernels_pallas.masks import BlockCausal

    q, k, v, _ = _inputs(2, 20, 20, 4, 2, 16, jnp.float32)
    key_mask = _key_mask(2, 20, [20, 15])
    want = jax.jit(lambda q, k, v: attention(q, k, v, mask=BlockCausal(4), key_mask=key_mask))(q, k, v)
    got = jax.jit(lambda q, k, v: kp.attention_for_model(q, k, v, mask=BlockCausal(4), key_mask=key_mask,
                                                         impl="auto"))(q, k, v)
    _assert_close(got, want, jnp.float32)


# ------------------------------------------------------------------------------------------------- errors


def test_explicit_kernel_unavailable_on_this_platform_raises():
    q, k, v, _ = _inputs(1, 8, 8, 1, 1, 128, jnp.float32)
    for impl, word in (("mosaic", "TPU"), ("triton", "GPU")):
        with pytest.raises(ValueError, match=f"impl='{impl}' is a {word} kernel"):
            kp.block_attention(q, k, v, mask=kp.Full(), impl=impl)
    with pytest.raises(ValueError, match="not one of"):
        kp.block_attention(q, k, v, mask=kp.Full(), impl="flash")
    with pytest.raises(ValueError, match="interpret=True applies"):
        kp.block_attention(q, k, v, mask=kp.Full(), impl="xla", interpret=True)


@pytest.mark.parametrize("platform,dh,bq,bk,match", [
    ("tpu", 64, 128, 128, "head_dim=64"),
    ("tpu", 128, 128, 96, "block_k=96"),
    ("tpu", 128, 72, 128, "block_q=72"),
    ("cuda", 64, 24, 64, "block_q=24"),
])
def test_bad_tiling_names_field_value_and_rule(platform, dh, bq, bk, match):
    q, k, v, _ = _inputs(1, 256, 256, 1, 1, dh, jnp.float32)
    with kp.lowering_target(platform), pytest.raises(ValueError, match=match):
        kp.block_attention(q, k, v, mask=kp.Full(), block_q=bq, block_k=bk)


def test_shape_errors():
    q, k, v, _ = _inputs(1, 8, 8, 3, 2, 16, jnp.float32)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kp.block_attention(q, k, v, mask=kp.Full(), impl="reference")
    with pytest.raises(ValueError, match="must divide length"):
        kp.Bd3Training(10, 4)


# ------------------------------------------------------------------------------------------------- slow grid


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["mosaic", "triton"])
def test_kernel_block_causal_mqa_bf16_slow(impl):
    _check_against_reference(impl, kp.BlockCausal(8), (1, 40, 40, 4, 1, 32), jnp.bfloat16, block_q=16, block_k=16,
                             interpret=True, key_mask=_key_mask(1, 40, [33]))


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["mosaic", "triton"])
@pytest.mark.parametrize("mask", [kp.Causal(), kp.BlockCausal(16), kp.Bd3Training(48, 16)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("blocks", [(16, 16), (32, 16), (16, 64)])
def test_kernel_grid_slow(impl, mask, dtype, blocks):
    n = 96 if isinstance(mask, kp.Bd3Training) else 83
    extras = {"key_mask": _key_mask(2, n, [n, n - 9]), "segment_ids": _segments(2, n)}
    _check_against_reference(impl, mask, (2, n, n, 4, 2, 32), dtype, block_q=blocks[0], block_k=blocks[1],
                             interpret=True, **extras)


# ------------------------------------------------------------------------- TPU interpret mode (simulated TPU)
# pltpu.InterpretParams simulates TPU memory: out-of-bounds block reads raise and uninitialised scratch reads
# NaN, so these catch index-map and init bugs that plain interpret mode forgives. TPU-legal tiles only.


def test_cached_attention_tpu_interpret_mode():
    from jax.experimental.pallas import tpu as pltpu

    b, s, lb, h, hkv, dh = 3, 300, 16, 2, 1, 128  # S off the 128 tile; lengths: empty, mid-tile, full
    ks = jax.random.split(jax.random.PRNGKey(4), 5)
    q = jax.random.normal(ks[0], (b, lb, h, dh))
    k_cache, v_cache = (jax.random.normal(key, (b, s, hkv, dh)) for key in ks[1:3])
    k_block, v_block = (jax.random.normal(key, (b, lb, hkv, dh)) for key in ks[3:5])
    lengths = jnp.array([0, 130, 300])
    got = jax.jit(lambda *a: kp.cached_attention(*a, impl="mosaic", block_k=128, interpret=pltpu.InterpretParams()))(
        q, k_cache, v_cache, k_block, v_block, lengths)
    want = jax.jit(reference.cached_attention)(q, k_cache, v_cache, k_block, v_block, lengths)
    _assert_close(got, want, jnp.float32)


def test_cached_attention_ranges_tpu_interpret_mode():
    """Dual-cache ranges with left padding and a chunk longer than a cache tile (block keys in 128-row tiles) and
    than a q tile (two q tiles resident in one program, the cache tiles read once for both)."""
    from jax.experimental.pallas import tpu as pltpu

    b, s, lb, h, hkv, dh = 2, 300, 200, 2, 1, 128
    ks = jax.random.split(jax.random.PRNGKey(6), 5)
    q = jax.random.normal(ks[0], (b, lb, h, dh))
    k_cache, v_cache = (jax.random.normal(key, (b, s, hkv, dh)) for key in ks[1:3])
    k_block, v_block = (jax.random.normal(key, (b, lb, hkv, dh)) for key in ks[3:5])
    cache_ranges = jnp.asarray([[[5, 100], [140, 290]], [[0, 0], [200, 300]]])
    block_key_mask = jnp.ones((b, lb), bool).at[0, 180:].set(False)
    got = jax.jit(lambda *a: kp.cached_attention(*a[:6], block_key_mask=a[6], impl="mosaic", block_q=128,
                                                 block_k=128, interpret=pltpu.InterpretParams()))(
        q, _poison_outside(k_cache, cache_ranges), _poison_outside(v_cache, cache_ranges), k_block, v_block,
        cache_ranges, block_key_mask)
    want = jax.jit(reference.cached_attention)(q, k_cache, v_cache, k_block, v_block, cache_ranges, block_key_mask)
    _assert_close(got, want, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("mask", [kp.Bd3Training(150, 30), kp.BlockCausal(64)])
def test_block_attention_tpu_interpret_mode_slow(mask):
    from jax.experimental.pallas import tpu as pltpu

    n = 300
    extras = {"key_mask": _key_mask(1, n, [290]), "segment_ids": _segments(1, n)}
    _check_against_reference("mosaic", mask, (1, n, n, 2, 1, 128), jnp.float32, block_q=128, block_k=128,
                             interpret=pltpu.InterpretParams(), **extras)
