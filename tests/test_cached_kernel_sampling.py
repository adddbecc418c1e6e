"""The cache kernel inside the samplers: with `model.attention_impl=pallas_interpret` every cached step of the masked
sampler (Fast-dLLM prefix and dual caches) and of the block sampler (its exact cache) runs
`kernels_pallas.cached_attention` over per-row slot ranges, and gives the dense (`xla`) path's tokens and NFE:
left-padded ragged prompts, right-padded suffixes, guidance (doubled batch), Dream's lead slot, the tiny_llada
golden cases. Slots outside a row's ranges never matter, even holding NaN. With `attention_impl=pallas` the whole
cached samplers export for TPU (Mosaic) and CUDA (Triton) with the cache kernel inside.

CUDA export needs `disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]`: the
Triton custom call is not on jax.export's list of stable custom calls.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import pytest
from jax import export

import dlmjax
import kernels_pallas as kp
from conftest import GOLDEN, tiny_model_config
from dlmjax.config import ModelConfig
from dlmjax.interchange import import_hf
from dlmjax.models.transformer import Transformer, init_cache, init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, SamplerSettings, generate_blocks, generate_masked

CFG = tiny_model_config(max_seq_len=40, n_layers=1)  # 4 query / 2 key-value heads, head_dim 8
MASK = 39
PARAMS = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0))
IMPLS = ("xla", "pallas_interpret")
PROMPTS = [[5, 9, 11], [7, 8, 20, 21, 22, 30, 31], [12, 13]]  # left-padded into an 8-slot bucket


@dataclasses.dataclass(frozen=True)
class Poisoned(Denoiser):
    """A Denoiser whose cached calls first write NaN into every cache slot the call must not see: outside the row's
    ranges and not holding a real key (left padding, the hidden block, slots not written yet)."""

    def forward_cached(self, params, tokens, *, cache, cache_ranges=None, **kwargs):
        seen = cache["key_mask"]
        if cache_ranges is not None:
            seen = seen & kp.ranges.slot_mask(cache_ranges, seen.shape[1])
        hidden = ~seen[None, :, :, None, None]
        cache = {**cache, "k": jnp.where(hidden, jnp.nan, cache["k"]), "v": jnp.where(hidden, jnp.nan, cache["v"])}
        return super().forward_cached(params, tokens, cache=cache, cache_ranges=cache_ranges, **kwargs)


def _model(impl: str, **changes) -> ModelConfig:
    return dataclasses.replace(CFG, attention_impl=impl, **changes)


MASKED_CASES = {
    "prefix-fixed": dict(cache="prefix"),
    "prefix-threshold-cfg": dict(cache="prefix", threshold=0.5, cfg_scale=0.5),
    "dual-fixed-cfg": dict(cache="dual", cfg_scale=1.0),
    # Right-padded suffixes (the second range ends before the canvas does); layers under nn.scan.
    "dual-threshold-suffix-scan": dict(cache="dual", threshold=0.5, suffix=[[30, 31], [32], [33, 34, 35]],
                                       model=dict(scan_layers=True)),
    # Dream's lead slot: the chunk starts one slot before the block.
    "dual-dream": dict(cache="dual", threshold=0.5, model=dict(arch="dream", qkv_bias=True)),
}
BLOCK_CASES = {"block2": 2, "block4": 4}


@functools.lru_cache(maxsize=None)
def run_masked(case: str, impl: str, poisoned: bool = False):
    kw = dict(MASKED_CASES[case])
    suffix = kw.pop("suffix", None)
    model = kw.pop("model", {})
    params = PARAMS if not model else jax.jit(init_params, static_argnums=0)(_model("xla", **model), jax.random.key(1))
    settings = SamplerSettings.llada(gen_length=8, steps=8, block_length=4, mask_id=MASK, **kw)
    denoiser = (Poisoned if poisoned else Denoiser)(_model(impl, **model))
    out = dlmjax.generate(denoiser, params, PROMPTS, settings, suffix_ids=suffix, bucket=8)
    return out.rows(), out.nfe


@functools.lru_cache(maxsize=None)
def run_blocks(block_length: int, impl: str, poisoned: bool = False):
    settings = BlockSamplerSettings.bd3(max_length=12, block_length=block_length, mask_id=MASK)
    denoiser = (Poisoned if poisoned else Denoiser)(_model(impl))
    out = dlmjax.generate(denoiser, PARAMS, [[5, 9, 11, 13, 2], [7], [4, 4, 8]], settings, bucket=4)
    return out.rows(), out.nfe


@pytest.mark.parametrize("case", sorted(MASKED_CASES))
def test_masked_sampler_kernel_equals_dense(case):
    dense, kernel = run_masked(case, "xla"), run_masked(case, "pallas_interpret")
    assert kernel == dense


def test_pallas_on_cpu_runs_the_blockwise_xla_twin():
    """`attention_impl=pallas` with no accelerator: `impl="auto"` picks the cache kernel's XLA twin."""
    assert run_masked("dual-fixed-cfg", "pallas") == run_masked("dual-fixed-cfg", "xla")


def test_cache_ranges_errors():
    model = Transformer(CFG)
    tokens = jnp.zeros((2, 4), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
    cache = init_cache(CFG, 2, 8)
    with pytest.raises(ValueError, match="it needs cache="):
        model.apply({"params": PARAMS}, tokens, cache_ranges=jnp.zeros((2, 1, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"cache_ranges must be int \[batch=2, R, 2\]"):
        model.apply({"params": PARAMS}, tokens, positions=positions, cache=cache,
                    cache_ranges=jnp.zeros((2, 2), jnp.int32))


@pytest.mark.parametrize("block_length", sorted(BLOCK_CASES.values()))
def test_block_sampler_kernel_equals_dense(block_length):
    dense, kernel = run_blocks(block_length, "xla"), run_blocks(block_length, "pallas_interpret")
    assert kernel == dense
    assert all(MASK not in row for row in kernel[0])


@pytest.mark.parametrize("case, impl", [("prefix-fixed", "pallas_interpret"), ("dual-fixed-cfg", "pallas_interpret"),
                                        ("block2", "pallas_interpret"), ("dual-fixed-cfg", "xla")])
def test_nan_in_hidden_cache_slots_changes_nothing(case, impl):
    """NaN in left padding, the hidden block, the slots after a prefix-cache block and the block cache's unwritten
    tail: 0 * NaN = NaN, so only `where` keeps them out, in the kernel and on the dense path (one dense case: its
    guard is the same code for every cache mode)."""
    if case in BLOCK_CASES:
        assert run_blocks(BLOCK_CASES[case], impl, poisoned=True) == run_blocks(BLOCK_CASES[case], impl)
    else:
        assert run_masked(case, impl, poisoned=True) == run_masked(case, impl)


def _pallas_calls(jaxpr_text: str) -> dict[str, int]:
    return {name: jaxpr_text.count(f"name={name}") for name in ("cached_attention", "block_attention_fwd")}


def test_every_cached_step_calls_the_cache_kernel():
    """The traced samplers hold the cache kernel once per layer and cached call site, and no dense cache mask."""
    prompt = jnp.asarray([[0, 5, 9, 11]], jnp.int32)
    prompt_mask = jnp.asarray([[False, True, True, True]])
    for impl in IMPLS:
        denoiser = Denoiser(_model(impl))
        dual = SamplerSettings.llada(gen_length=8, steps=8, block_length=4, mask_id=MASK, cache="dual")
        text = str(jax.make_jaxpr(lambda p: generate_masked.__wrapped__(
            denoiser, p, prompt, dual, jax.random.key(0), prompt_mask=prompt_mask))(PARAMS))
        blocks = BlockSamplerSettings.bd3(max_length=12, block_length=4, mask_id=MASK)
        text_blocks = str(jax.make_jaxpr(lambda p: generate_blocks.__wrapped__(
            denoiser, p, prompt, blocks, jax.random.key(0), prompt_mask=prompt_mask))(PARAMS))
        layers = CFG.n_layers
        if impl == "xla":
            assert _pallas_calls(text) == _pallas_calls(text_blocks) == {"cached_attention": 0,
                                                                         "block_attention_fwd": 0}
        else:
            # masked: the dual cache's steps (cached kernel), its first pass per block (the chunk's own attention,
            # no cache read); blocks: denoise + commit (cached kernel); the prefill has a dense block-causal mask.
            assert _pallas_calls(text) == {"cached_attention": layers, "block_attention_fwd": layers}
            assert _pallas_calls(text_blocks) == {"cached_attention": 2 * layers, "block_attention_fwd": 0}


# ---------------------------------------------------------------------------------------------------------------
# Golden parity with the kernel


GOLDEN_CASES = ["p0/fastdllm_generate_with_dual_cache_threshold0.9", "p1/fastdllm_generate_with_prefix_cache_fixed"]


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_tiny_llada_golden_tokens_with_the_cache_kernel(name):
    """Fast-dLLM's dual and prefix caches (tests/golden/tiny_llada), left-padded into a 16-slot bucket: the
    kernel path gives the original code's tokens and NFE."""
    cfg, params, _ = import_hf(GOLDEN / "tiny_llada", "llada")
    case = {c["name"]: c for c in json.loads((GOLDEN / "tiny_llada" / "golden.json").read_text())["cases"]}[name]
    k = case["kwargs"]
    settings = SamplerSettings.llada(
        mask_id=cfg.diffusion.mask_id, gen_length=k["gen_length"], steps=k["steps"], block_length=k["block_length"],
        remasking=k["remasking"], temperature=k["temperature"], threshold=k.get("threshold"),
        cache="dual" if "dual" in case["function"] else "prefix")
    model = dataclasses.replace(cfg.model, attention_impl="pallas_interpret")
    out = dlmjax.generate(model, params, [case["prompt"]], settings)
    assert out.width == 16 and out.rows() == case["output_ids"] and out.nfe == case["nfe"]


# ---------------------------------------------------------------------------------------------------------------
# Lowering the whole cached samplers for TPU and CUDA

EXPORT = {
    "tpu": dict(marker="tpu_custom_call", disabled=()),
    "cuda": dict(marker="__gpu$xla.gpu.triton",
                 disabled=(export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),)),
}
# head_dim 128: the TPU kernels' lane rule (smaller heads take impl='xla' there).
EXPORT_MODEL = ModelConfig(vocab_size=64, d_model=256, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64,
                           max_seq_len=64, attention_impl="pallas")


def _export_text(platform: str, sampler, settings) -> str:
    """The exported MLIR of the jitted sampler for `platform`. The unjitted body is wrapped in a fresh jit per
    target: jit caches traces by static arguments and shapes, not by `lowering_target`."""
    denoiser = Denoiser(EXPORT_MODEL)
    params = jax.eval_shape(lambda: init_params(EXPORT_MODEL, jax.random.key(0)))

    def run(params, prompt, prompt_mask, rng):
        return sampler.__wrapped__(denoiser, params, prompt, settings, rng, prompt_mask=prompt_mask)

    args = (params, jax.ShapeDtypeStruct((2, 8), jnp.int32), jax.ShapeDtypeStruct((2, 8), jnp.bool_),
            jax.eval_shape(lambda: jax.random.key(0)))
    with kp.lowering_target(platform):
        exported = export.export(jax.jit(run), platforms=[platform],
                                 disabled_checks=list(EXPORT[platform]["disabled"]))(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", sorted(EXPORT))
def test_cached_samplers_export_with_the_cache_kernel(platform):
    dual = SamplerSettings.llada(gen_length=16, steps=16, block_length=8, mask_id=63, cache="dual", threshold=0.9)
    blocks = BlockSamplerSettings.bd3(max_length=24, block_length=8, mask_id=63)
    for sampler, settings in ((generate_masked, dual), (generate_blocks, blocks)):
        text = _export_text(platform, sampler, settings)
        assert "cached_attention" in text, f"{sampler.__name__}: no cache kernel in the {platform} export"
        # One layer: the masked sampler's first pass (block_attention) and cached step; the block sampler's
        # denoise and commit passes (cached_attention twice; its prefill has a dense block-causal mask).
        assert text.count(EXPORT[platform]["marker"]) == 2
