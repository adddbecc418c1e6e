"""Models: the LLaDA-style transformer and the attention dispatch it uses."""
from dlmjax.models.attention import Bd3TrainingMask, BlockCausalMask, CausalMask, FullMask, MaskSpec, attention
from dlmjax.models.transformer import Denoiser, Transformer, count_params, init_cache, init_params

__all__ = ["Bd3TrainingMask", "BlockCausalMask", "CausalMask", "Denoiser", "FullMask", "MaskSpec", "Transformer",
           "attention", "count_params", "init_cache", "init_params"]
