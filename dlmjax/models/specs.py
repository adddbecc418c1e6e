"""The shapes, dtypes and logical axes of a model's parameters, and their shardings on a mesh, without allocating.

Training (the train state), loading (`dlmjax.checkpoint.load`) and import (`dlmjax.interchange`) all need the
same answer to "what does the parameter tree of this `ModelConfig` look like and where does each array go"; this
module is the one place that answers it. Nothing here depends on the optimizer or the training loop.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh

from dlmjax.config import LogicalRules, ModelConfig
from dlmjax.models.transformer import build_model
from dlmjax.sharding import LOGICAL_RULES, logical_to_sharding

__all__ = ["param_shardings", "param_specs"]


def _boxed_variables(model_cfg: ModelConfig):
    tokens = jnp.zeros((1, 8), jnp.int32)
    return jax.eval_shape(lambda rng: build_model(model_cfg).init(rng, tokens), jax.random.PRNGKey(0))


def param_specs(model_cfg: ModelConfig):
    """(ShapeDtypeStruct tree of the parameters, their logical PartitionSpecs); allocates nothing."""
    boxed = _boxed_variables(model_cfg)
    return nn.unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


def param_shardings(model_cfg: ModelConfig, mesh: Mesh | AbstractMesh, rules: LogicalRules = LOGICAL_RULES):
    """(ShapeDtypeStruct tree of the parameters, their NamedShardings on `mesh` under the logical-axis `rules`).

    Dimensions the rules cannot split evenly fall back as `dlmjax.sharding.resolve_spec` describes.
    """
    like, logical = param_specs(model_cfg)
    return like, logical_to_sharding(logical, mesh, rules, shapes=like)
