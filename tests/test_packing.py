"""Packed rows: segment ids, per-document positions, diffusion-block alignment, no attention across documents
(model logits of a document are the same packed or alone) and padding that the losses ignore."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlmjax.config import DiffusionConfig, ModelConfig
from dlmjax.data import ByteTokenizer, pack_documents
from dlmjax.models.attention import attention
from dlmjax.models.transformer import build_model, init_params
from dlmjax.train.objective import bd3_loss_terms, diffusion_loss

TOK = ByteTokenizer()
IDS = dict(pad_id=TOK.pad_id, bos_id=TOK.bos_id, eos_id=TOK.eos_id)
DOCS = [TOK.encode_array(t) for t in ("first document", "2nd", "a third, longer document here", "x" * 70)]


def packed(docs=DOCS, seq_len=32, block_size=0, mode="wrap"):
    return pack_documents(docs, seq_len=seq_len, block_size=block_size, mode=mode, **IDS)


def pieces_of(rows) -> list[np.ndarray]:
    """Every segment's tokens in row order, checking what holds in both modes on the way: segments are contiguous,
    positions restart at 0 in each, padding is pad / segment 0 / position 0 / invalid."""
    out = []
    for tokens, segs, pos, valid in zip(rows["tokens"], rows["segment_ids"], rows["positions"], rows["valid_mask"]):
        assert np.array_equal(valid, segs > 0)
        assert (tokens[~valid] == TOK.pad_id).all() and (pos[~valid] == 0).all()
        assert np.array_equal(np.unique(segs[segs > 0]), np.arange(1, segs.max() + 1))
        for s in range(1, segs.max() + 1):
            where = np.flatnonzero(segs == s)
            assert np.array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            assert np.array_equal(pos[where], np.arange(len(where)))  # positions restart at 0
            out.append((tokens[where], where[0]))
    return out


def framed(docs=DOCS):
    return [np.concatenate([[TOK.bos_id], doc, [TOK.eos_id]]) for doc in docs]


@pytest.mark.parametrize("block_size", [0, 4, 8])
@pytest.mark.parametrize("mode", ["wrap", "fit"])
def test_segments_positions_and_block_alignment(block_size, mode):
    seq_len = 32
    rows = packed(block_size=block_size, mode=mode)
    got = pieces_of(rows)
    # Nothing lost, nothing reordered: the pieces concatenate to the framed documents.
    assert np.array_equal(np.concatenate([t for t, _ in got]), np.concatenate(framed()))
    if block_size:
        assert all(start % block_size == 0 for _, start in got)  # every piece starts on a block boundary
        for segs in rows["segment_ids"]:  # no block holds two pieces
            for blk in segs.reshape(-1, block_size):
                assert len(set(blk[blk > 0].tolist())) <= 1
    unit = block_size or 1
    if mode == "fit":  # a document is cut only where it is longer than a row, at multiples of the row
        want = [f[i: i + seq_len] for f in framed() for i in range(0, len(f), seq_len)]
        assert len(got) == len(want) and all(np.array_equal(a, b) for (a, _), b in zip(got, want))
    else:  # every row but the last is full up to the alignment padding of its pieces
        for valid, segs in zip(rows["valid_mask"][:-1], rows["segment_ids"][:-1]):
            n_pieces = segs.max()
            assert valid.sum() > seq_len - n_pieces * (unit - 1) - 1 or valid.all()
            assert segs[-1] > 0 or block_size  # without alignment the last slot is always used
    assert not rows["prompt_mask"].any()


def test_wrap_fills_rows_that_fit_leaves_padded():
    docs = [TOK.encode_array("a" * n) for n in (20, 20, 20)]  # framed: 22 each, 66 tokens in all
    fit, wrap = packed(docs, mode="fit"), packed(docs, mode="wrap")
    assert len(fit["tokens"]) == 3 and fit["valid_mask"].sum() == 66
    assert len(wrap["tokens"]) == 3 and wrap["valid_mask"][:2].all() and wrap["valid_mask"].sum() == 66
    assert wrap["segment_ids"][0].max() == 2 and wrap["positions"][1, 0] == 0  # the cut piece restarts


def test_pack_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data.packing='greedy'"):
        packed(mode="greedy")


def test_pack_rejects_misaligned_blocks():
    with pytest.raises(ValueError, match="block_size=5 must be 0 or divide seq_len=32"):
        packed(block_size=5)


CFG = ModelConfig(vocab_size=260, d_model=32, n_layers=2, n_heads=4, mlp_hidden=64, max_seq_len=64)


@functools.cache
def params_of(cfg: ModelConfig, seed: int = 0):
    # Jitted: eager initialisation dispatches op by op and takes seconds on a busy 2-core host.
    return jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(seed))


def perturbed(params):
    rng = np.random.default_rng(1)  # numpy: jax.random over every leaf shape compiles for seconds
    return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), params)


@pytest.mark.parametrize("arch", ["llada", "dit"])
def test_document_logits_do_not_depend_on_neighbours(arch):
    cfg = ModelConfig(**{**CFG.__dict__, "arch": arch, **({"time_conditioning": False} if arch == "dit" else {})})
    params = params_of(cfg)
    # The DiT's output layer and adaLN start at zero (logits all 0): perturb every weight so logits depend on input.
    params = perturbed(params)
    rows = packed(DOCS[:3], seq_len=64, block_size=8)
    assert len(rows["tokens"]) == 1 and rows["segment_ids"].max() == 3
    # One forward (one compile) over five rows: the packed row; the same row with one segment for all its real
    # tokens (no segment mask: neighbours leak in); each document alone at the start of an otherwise padded row.
    alone = [packed([doc], seq_len=64) for doc in DOCS[:3]]
    batch = {k: np.concatenate([rows[k], rows[k]] + [a[k] for a in alone]) for k in rows}
    batch["segment_ids"][1] = batch["valid_mask"][1]
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = jax.jit(build_model(cfg).apply)({"params": params}, batch["tokens"], positions=batch["positions"],
                                             key_mask=batch["valid_mask"], segment_ids=batch["segment_ids"])
    segs = rows["segment_ids"][0]
    for s, doc in enumerate(DOCS[:3], start=1):
        n = len(doc) + 2
        np.testing.assert_allclose(np.asarray(logits[0, segs == s]), np.asarray(logits[1 + s, :n]), rtol=1e-5,
                                   atol=1e-5)
    leaky = logits[1:2]
    assert not np.allclose(np.asarray(leaky[0, segs == 2]), np.asarray(logits[0, segs == 2]), atol=1e-5)


@pytest.mark.parametrize("impl", ["pallas", "pallas_interpret"])
def test_pallas_path_honours_segments(impl):
    """The pallas paths hand segment_ids to kernels_pallas (on CPU: its blockwise XLA path, and the Triton kernel
    in interpret mode); they match the dense path's segment mask."""
    rng = np.random.default_rng(0)
    b, length, h, dh = 2, 32, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, length, h, dh)), jnp.float32) for _ in range(3))
    segs = jnp.asarray(np.repeat(np.array([[1, 1, 2, 3], [1, 2, 2, 0]]), 8, axis=1), jnp.int32)
    key_mask = segs > 0
    want = attention(q, k, v, key_mask=key_mask, segment_ids=segs, impl="xla")
    got = attention(q, k, v, key_mask=key_mask, segment_ids=segs, impl=impl)
    real = np.asarray(key_mask)  # padding queries see no key: 0 on one path, a mean on the other; unused
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)


def test_bd3_document_nll_does_not_depend_on_neighbours():
    """BD3's two-stream forward with segments: a document's per-token NLL is the same packed or alone."""
    diff = DiffusionConfig(objective="bd3", block_size=8)
    params = params_of(CFG)
    rows = packed(DOCS[:3], seq_len=64, block_size=8)
    segs = rows["segment_ids"][0]
    rng = np.random.default_rng(0)
    t = np.repeat(rng.uniform(0.2, 1.0, (1, 8)), 8, axis=1).astype(np.float32)
    u = rng.uniform(size=(1, 64)).astype(np.float32)
    u[0, np.flatnonzero(segs == 2)[1:3]] = 0.0  # some slots of the compared document are surely masked
    batch = {k: jnp.asarray(v) for k, v in rows.items()}
    terms = jax.jit(functools.partial(bd3_loss_terms, model_cfg=CFG, diff_cfg=diff))
    _, aux = terms(params, batch, jnp.asarray(t), jnp.asarray(u))
    assert not np.asarray(aux["scored"])[~rows["valid_mask"]].any()
    where = np.flatnonzero(segs == 2)  # the middle document, moved to the start of its own row
    alone = packed([DOCS[1]], seq_len=64, block_size=8)
    n = len(where)
    t_alone, u_alone = np.ones((1, 64), np.float32), np.ones((1, 64), np.float32)
    t_alone[0, :n], u_alone[0, :n] = t[0, where], u[0, where]
    t_alone[0, n:8] = t[0, where[0]]  # the rest of its block keeps the block's time
    _, aux_alone = terms(params, {k: jnp.asarray(v) for k, v in alone.items()}, jnp.asarray(t_alone),
                         jnp.asarray(u_alone))
    assert np.asarray(aux["is_masked"])[0, where].any()
    np.testing.assert_allclose(np.asarray(aux["nll"])[0, where], np.asarray(aux_alone["nll"])[0, :n],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["mdlm", "llada", "bd3"])
def test_padding_is_excluded_from_the_loss(objective):
    diff = DiffusionConfig(objective=objective, schedule="loglinear" if objective == "mdlm" else "llada",
                           block_size=8 if objective == "bd3" else 0)
    params = params_of(CFG)
    rows = packed(DOCS[:3], seq_len=64, block_size=8)
    rows = {k: np.repeat(v, 2, axis=0) for k, v in rows.items()}
    assert (~rows["valid_mask"]).sum() > 0
    noisy = dict(rows, tokens=np.where(rows["valid_mask"], rows["tokens"], np.arange(64) % 200))
    noisy["positions"] = np.where(rows["valid_mask"], rows["positions"], 7)
    key = jax.random.key(3)
    loss_fn = jax.jit(functools.partial(diffusion_loss, model_cfg=CFG, diff_cfg=diff))
    loss, _ = loss_fn(params, {k: jnp.asarray(v) for k, v in rows.items()}, key)
    loss2, _ = loss_fn(params, {k: jnp.asarray(v) for k, v in noisy.items()}, key)
    assert np.isfinite(float(loss)) and float(loss) > 0
    np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)
