"""The LLaDA/LLaMA-style bidirectional transformer (the default dlmjax denoiser).

Pure Flax Linen: `Transformer(config).init(...)` gives an explicit parameter pytree and `.apply(...)` is a
pure function of it. Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`,
`mlp`, `norm`, `layers`) and activations are constrained to (`batch`, `length`, `embed` ...); one rules
table (`dlmjax.sharding.LOGICAL_RULES`) maps them onto the device mesh.

Parameter names follow the released LLaDA checkpoints (`wte`, `attn_norm`, `q_proj`, ..., `ff_out`, `ln_f`)
so that checkpoint interchange is a rename and a transpose.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from dlmjax.config import ModelConfig
from dlmjax.models.attention import FullMask, MaskSpec, attention
from dlmjax.models.layers import DTYPES, Dense, RMSNorm, apply_rotary, dense_init, rotary_tables

BATCH_LENGTH_EMBED = ("batch", "length", "embed")


class Block(nn.Module):
    """Pre-norm block: x += attn(RMSNorm(x)); x += SwiGLU(RMSNorm(x))."""

    config: ModelConfig
    mask: MaskSpec = FullMask()

    @nn.compact
    def __call__(self, x, cos, sin, key_mask, dense_mask):
        cfg = self.config
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        b, length, _ = x.shape
        # Residual projections start smaller so the residual stream does not grow with depth.
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        proj = lambda n, feat, axes, std=cfg.init_std: Dense(feat, axes, std, dtype, pdt, name=n)  # noqa: E731

        h = RMSNorm(cfg.norm_eps, pdt, name="attn_norm")(x)
        q = proj("q_proj", cfg.n_heads * cfg.head_dim, ("embed", "heads"))(h)
        k = proj("k_proj", cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"))(h)
        v = proj("v_proj", cfg.num_kv_heads * cfg.head_dim, ("embed", "kv_heads"))(h)
        q = q.reshape(b, length, cfg.n_heads, cfg.head_dim)
        k = k.reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, length, cfg.num_kv_heads, cfg.head_dim)
        q = nn.with_logical_constraint(apply_rotary(q, cos, sin), ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(apply_rotary(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
        a = attention(q, k, v, mask=self.mask, key_mask=key_mask, dense_mask=dense_mask, impl=cfg.attention_impl)
        a = proj("attn_out", cfg.d_model, ("heads", "embed"), out_std)(a.reshape(b, length, -1))
        x = nn.with_logical_constraint(x + a.astype(x.dtype), BATCH_LENGTH_EMBED)

        h = RMSNorm(cfg.norm_eps, pdt, name="ff_norm")(x)
        gate = proj("ff_proj", cfg.mlp_hidden, ("embed", "mlp"))(h)
        up = proj("up_proj", cfg.mlp_hidden, ("embed", "mlp"))(h)
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        x = x + proj("ff_out", cfg.d_model, ("mlp", "embed"), out_std)(hidden).astype(x.dtype)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        self.sow("intermediates", "hidden", x)
        return x, None


class Transformer(nn.Module):
    """tokens int32 [B, L] -> logits float32 [B, L, V]."""

    config: ModelConfig
    mask: MaskSpec = FullMask()

    @nn.compact
    def __call__(self, tokens, *, positions=None, key_mask=None, dense_mask=None):
        """
        Args:
          tokens: int32 [B, L].
          positions: int32 [B, L] rotary positions (default 0..L-1). BD3-LM feeds [x_t ; x_0] with the same
            positions on both halves, and left-padded rows may shift theirs.
          key_mask: bool [B, L], False on padding keys.
          dense_mask: bool [B or 1, L, L], an arbitrary extra attention mask.
        """
        cfg = self.config
        dtype, pdt = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        b, length = tokens.shape
        wte = self.param("wte", nn.with_logical_partitioning(dense_init(cfg.init_std), ("vocab", "embed")),
                         (cfg.vocab_size, cfg.d_model), pdt)
        x = jnp.take(wte, tokens, axis=0).astype(dtype)
        x = nn.with_logical_constraint(x, BATCH_LENGTH_EMBED)
        self.sow("intermediates", "embedding", x)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        cos, sin = rotary_tables(positions, cfg.head_dim, cfg.rope_theta)

        block_cls = Block
        if cfg.remat:
            block_cls = nn.remat(block_cls, prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # One traced block for all layers: compile time independent of depth; params stacked on "layers".
            stack = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                            split_rngs={"params": True}, in_axes=nn.broadcast, length=cfg.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = stack(cfg, self.mask, name="blocks")(x, cos, sin, key_mask, dense_mask)
        else:
            for i in range(cfg.n_layers):
                x, _ = block_cls(cfg, self.mask, name=f"blocks_{i}")(x, cos, sin, key_mask, dense_mask)

        x = RMSNorm(cfg.norm_eps, pdt, name="ln_f")(x)
        self.sow("intermediates", "final_norm", x)
        if cfg.tie_embeddings:
            logits = jnp.dot(x, wte.astype(dtype).T, preferred_element_type=jnp.float32)
        else:
            head = self.param("ff_out", nn.with_logical_partitioning(dense_init(cfg.init_std), ("embed", "vocab")),
                              (cfg.d_model, cfg.vocab_size), pdt)
            logits = jnp.dot(x, head.astype(dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 8):
    """A fresh parameter pytree (logical-axis metadata stripped)."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = Transformer(config).init(rng, tokens)
    return nn.unbox(variables["params"])


def count_params(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))


@dataclasses.dataclass(frozen=True)
class Denoiser:
    """Hashable, static view of a model for samplers: (params, tokens, key_mask) -> float32 logits [B, L, V].

    Samplers take it as a static argument of `jax.jit` and the parameters as a traced argument, so weights
    are never baked into the compiled program.
    """

    config: ModelConfig
    mask: MaskSpec = FullMask()

    def __call__(self, params, tokens, key_mask=None, positions=None):
        return Transformer(self.config, self.mask).apply({"params": params}, tokens, key_mask=key_mask,
                                                         positions=positions)
