"""dlmjax: diffusion language models in JAX.

Glossary (names in the code follow it; see ../README.md for the longer version):

  mask id        Vocabulary index of the absorbing [MASK] state (`diffusion.mask_id`; 259 for the byte tokenizer).
  x_0, x_t       Clean tokens, and tokens after the forward process at noise level t (t=0 clean, t=1 all masked).
  alpha(t)       Probability that a token is still clean at time t; the mask probability is 1 - alpha(t).
  canvas         The token array the sampler is still changing: prompt + generation region.
  block          A contiguous run of `block_length` slots denoised together, left to right (semi-AR decoding).
  step           One denoiser forward pass followed by one canvas update (some masked slots committed).
  commit         Writing a proposed token into a masked slot; committed tokens are never re-masked.
  transfer count Number of commits scheduled for a step (LLaDA's `num_transfer_tokens`).
  confidence     Score ranking masked slots for commitment (probability of the proposal, or random).
  NFE            Number of denoiser forward passes actually executed.
  SUBS           MDLM's parameterisation: no mass on the mask token, unmasked slots copy their token.
  prefix / dual cache  K/V reuse for the prompt and finished blocks (prefix), and also the masked suffix (dual).
  block diffusion  BD3-LM: blocks of `block_size` tokens, autoregressive across blocks, masked diffusion
                 inside one; block size 1 is autoregression, block size = length is MDLM.
  prefill / commit pass  Forwards that write K/V into the block sampler's cache: the prompt's full blocks once,
                 then each finished block.

Entry points: `dlmjax.generate(params, prompt_ids, settings)` (the masked sampler: LLaDA, Fast-dLLM caches and
parallel decoding, Dream; ragged prompts in width buckets; `dlmjax.sampling.generate` is the jitted program), `dlmjax.generate_blocks` (jitted block-diffusion
sampler with a KV cache), `dlmjax.sample` (the sampler a run was trained for), `dlmjax.load` (config and params
of a checkpoint), `dlmjax.load_config`, `dlmjax.Denoiser`, and the `dlmjax` command line (`dlmjax.cli`).
"""
from dlmjax.checkpoint import load
from dlmjax.config import Config, load_config
from dlmjax.models.transformer import Denoiser, Transformer, init_params
from dlmjax.evaluate import sample
from dlmjax.sampling import BlockSamplerSettings, SamplerSettings, generate_blocks
from dlmjax.sampling.api import Generation, generate

__version__ = "0.1.0"
__all__ = ["BlockSamplerSettings", "Config", "Denoiser", "Generation", "SamplerSettings", "Transformer", "generate",
           "generate_blocks", "init_params", "load", "load_config", "sample"]
