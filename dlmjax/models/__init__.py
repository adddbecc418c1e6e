"""Models: the denoiser networks, their factory, and the attention dispatch they use.

`build_model(config, mask)` is the one place that maps `model.arch` to a Flax module; every module it returns
has the call signature of `Transformer` (tokens, positions=, key_mask=, dense_mask=, cache=, update_cache=)
so that training objectives and samplers never name an architecture.
"""
from dlmjax.config import ModelConfig
from dlmjax.models.attention import attention
from kernels_pallas.masks import Bd3Training, BlockCausal, Causal, Full, Mask  # the one definition
from dlmjax.models.transformer import Transformer, build_model, count_params, init_cache, init_params
from dlmjax.models.dit import DiT  # after transformer, which it builds on

__all__ = ["Bd3Training", "BlockCausal", "Causal", "DiT", "Full", "Mask",
           "ModelConfig", "Transformer", "attention", "build_model", "count_params", "init_cache", "init_params"]
