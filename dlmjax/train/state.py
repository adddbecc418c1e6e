"""The train state pytree, the optimizer, and their shardings on a mesh."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from dlmjax.config import LogicalRules, ModelConfig, OptimConfig
from dlmjax.models.specs import param_specs
from dlmjax.models.transformer import build_model
from dlmjax.sharding import LOGICAL_RULES, logical_to_sharding


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue exactly: a checkpoint of this resumes bit for bit.

    `rng` is a raw uint32 key; the key of step s is `fold_in(rng, s)`, so the noise of a step does not depend
    on how many steps ran before a restart.
    """

    step: jax.Array  # int32 []
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.decay == "wsd":
        tail = max(int(round(cfg.decay_fraction * total_steps)), 1)
        stable = max(decay_steps - tail, 0)
        decay = optax.join_schedules([optax.constant_schedule(cfg.lr), optax.linear_schedule(cfg.lr, end, tail)],
                                     [stable])
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def _init_variables(model_cfg: ModelConfig, rng: jax.Array):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return build_model(model_cfg).init(rng, tokens)


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: LogicalRules = LOGICAL_RULES):
    """NamedShardings for every leaf of the TrainState, derived from the parameters' logical axis names.

    Optimizer moments follow their parameter; scalars (Adam's count, the step) are replicated. Building the
    optimizer specs with `optax.tree_map_params` keeps scalars off a single device (a plain `tx.init` on
    sharded params would leave them there and clash with `out_shardings`). `mesh` may be an `AbstractMesh`
    (`dlmjax plan`). Dimensions the rules cannot split evenly fall back (see `dlmjax.sharding.resolve_spec`).
    """
    abstract_params, logical = param_specs(model_cfg)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    opt_specs = optax.tree_map_params(tx, lambda _, spec: spec, abstract_opt, logical,
                                      transform_non_params=lambda _: P(), is_leaf=is_spec)
    specs = TrainState(step=P(), params=logical, opt_state=opt_specs, rng=P())
    like = jax.eval_shape(_init_state_fn(model_cfg, tx), jax.random.PRNGKey(0))
    return logical_to_sharding(specs, mesh, rules, shapes=like)


def _init_state_fn(model_cfg: ModelConfig, tx: optax.GradientTransformation):
    def init(rng):
        init_rng, train_rng = jax.random.split(rng)
        params = nn.unbox(_init_variables(model_cfg, init_rng))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_rng)

    return init


def _state_from_params_fn(tx: optax.GradientTransformation):
    def init(params, rng):
        _, train_rng = jax.random.split(rng)  # the same training key as `_init_state_fn` draws from this seed
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=train_rng)

    return init


def init_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, mesh: Mesh,
                     rules: LogicalRules = LOGICAL_RULES):
    """A fresh TrainState created directly in its shardings (no full copy on one device first)."""
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    state = jax.jit(_init_state_fn(model_cfg, tx), out_shardings=shardings)(jax.random.PRNGKey(seed))
    return state, shardings


def init_train_state_from(params, tx: optax.GradientTransformation, seed: int, shardings):
    """A TrainState at step 0 around given `params` (already in `shardings.params`, donated): a fresh optimizer
    state and the training key a random initialisation with `seed` would have (`train.init_from`)."""
    fn = jax.jit(_state_from_params_fn(tx), out_shardings=shardings, donate_argnums=0)
    return fn(params, jax.random.PRNGKey(seed))


def abstract_train_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh,
                         rules: LogicalRules = LOGICAL_RULES):
    """(ShapeDtypeStruct tree of the TrainState, its shardings): a restore target that allocates nothing."""
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    like = jax.eval_shape(_init_state_fn(model_cfg, tx), jax.random.PRNGKey(0))
    return like, shardings
