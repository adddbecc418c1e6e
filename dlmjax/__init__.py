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

Entry points (the notebook API): `dlmjax.open_run(path)` (a checkpoint's config, parameters, token ids and
tokenizer), `dlmjax.load(path)` (config and parameters), `dlmjax.generate(model, params, prompt_ids, settings)`
(both samplers on ragged prompts in width buckets: `SamplerSettings` for the masked sampler, LLaDA / Fast-dLLM /
Dream, whose jitted program is `dlmjax.sampling.generate_masked`; `BlockSamplerSettings` for the block-diffusion
sampler with an exact KV cache, `dlmjax.generate_blocks`), `dlmjax.sample` (the sampler a run was trained for),
`dlmjax.load_config`, `dlmjax.Denoiser` (the static view of a model that the samplers call), the scores
`dlmjax.log_likelihood` (LLaDA's Monte Carlo estimate of log p(answer | prompt)), `dlmjax.greedy_check` and
`dlmjax.rolling_log_likelihood` (a text's NELBO bound, exact for AR runs), the lm-evaluation-harness model
`dlmjax.lm_eval`, generative perplexity `dlmjax.genppl`, and the `dlmjax` command line (`dlmjax.cli`). `dlmjax.inference` answers "which sampler, with which settings and token ids,
for this checkpoint" for all of them.
"""
import importlib

# Names are loaded on first use (PEP 562), so that `import dlmjax.sampling` does not pull in orbax, the data
# pipeline or the trainer: each subpackage imports only what its own job needs.
_EXPORTS = {
    "load": "dlmjax.checkpoint",
    "Config": "dlmjax.config", "load_config": "dlmjax.config",
    "Run": "dlmjax.inference", "SampleRequest": "dlmjax.inference", "open_run": "dlmjax.inference",
    "sample": "dlmjax.inference",
    "Transformer": "dlmjax.models.transformer", "init_params": "dlmjax.models.transformer",
    "BlockSamplerSettings": "dlmjax.sampling", "Denoiser": "dlmjax.sampling", "SamplerSettings": "dlmjax.sampling",
    "SpecialTokens": "dlmjax.sampling", "generate_blocks": "dlmjax.sampling",
    "Generation": "dlmjax.sampling.api", "generate": "dlmjax.sampling.api",
    "log_likelihood": "dlmjax.evaluate", "greedy_check": "dlmjax.evaluate",
    "rolling_log_likelihood": "dlmjax.evaluate",
}
_SUBPACKAGES = {"checkpoint", "cli", "config", "data", "diffusion", "distributed", "errors", "evaluate", "inference",
                "genppl", "interchange", "likelihood", "lm_eval", "models", "rolling", "sampling", "sharding", "train"}

__version__ = "0.1.0"
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"dlmjax.{name}")
    else:
        raise AttributeError(f"module 'dlmjax' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | _SUBPACKAGES)
