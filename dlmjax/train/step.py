"""Jitted train and eval steps: `train_step(state, batch) -> (state, metrics)`.

The train step donates the state (parameters and optimizer moments are updated in place) and runs under
explicit in/out shardings, so the same code runs on one CPU or a pod slice.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dlmjax.config import DiffusionConfig, LogicalRules, ModelConfig
from dlmjax.sharding import activation_rules
from dlmjax.train.objective import diffusion_loss, nelbo_sums
from dlmjax.train.state import TrainState


def train_step(state: TrainState, batch, *, tx: optax.GradientTransformation, model_cfg: ModelConfig,
               diff_cfg: DiffusionConfig):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_fn = functools.partial(diffusion_loss, model_cfg=model_cfg, diff_cfg=diff_cfg)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    if diff_cfg.objective == "bd3":  # the block length this compiled step trains with (diffusion.block_schedule)
        metrics["block_size"] = jnp.int32(diff_cfg.block_size or batch["tokens"].shape[1])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def make_train_step(tx, model_cfg: ModelConfig, diff_cfg: DiffusionConfig, state_shardings, batch_sharding,
                    rules: LogicalRules | None = None):
    """Compile-ready train step with the state donated and shardings fixed.

    With `rules` (the config's `mesh.rules`), the model's activation constraints (`nn.with_logical_constraint`)
    place activations on `batch_sharding.mesh` by those rules; without, they are left to XLA's propagation.
    `diff_cfg` is one block size's settings: a run with `diffusion.block_schedule` makes one step per size
    (`dlmjax.train.adapt.diffusion_at`). Compiles are logged as `jit(train_step)`.
    """
    if diff_cfg.block_schedule:
        raise ValueError("make_train_step takes one block size's settings: pass adapt.diffusion_at(cfg, size)")
    fn = functools.partial(train_step, tx=tx, model_cfg=model_cfg, diff_cfg=diff_cfg)
    if rules is not None:
        inner = fn

        def fn(state, batch):
            with activation_rules(batch_sharding.mesh, rules):
                return inner(state, batch)

        fn.__name__ = fn.__qualname__ = "train_step"

    return jax.jit(fn, in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
                   donate_argnums=0)


def make_eval_step(model_cfg: ModelConfig, diff_cfg: DiffusionConfig):
    """(params, batch, rng) -> (nelbo sum, token count), jitted."""
    return jax.jit(functools.partial(nelbo_sums, model_cfg=model_cfg, diff_cfg=diff_cfg))


# The arrays a step reads and their dtypes; packed rows (dlmjax.data.packing) add the last two.
BATCH_DTYPES = {"tokens": np.int32, "prompt_mask": np.bool_, "valid_mask": np.bool_,
                "segment_ids": np.int32, "positions": np.int32}
OPTIONAL_KEYS = ("segment_ids", "positions")


def host_batch(batch: dict) -> dict:
    """Keep only the arrays the step reads, as numpy arrays with the dtypes it expects (still on the host)."""
    return {k: np.asarray(batch[k], dtype) for k, dtype in BATCH_DTYPES.items()
            if k in batch or k not in OPTIONAL_KEYS}


def as_batch(batch: dict) -> dict:
    """`host_batch` on the default device."""
    return {k: jnp.asarray(v) for k, v in host_batch(batch).items()}
