"""Checkpoint interchange for the MDLM / BD3-LM DiT (`--arch mdlm|bd3lm`).

Two config.json layouts are read:
- the HF wrapper's flat config (`BD3LMConfig`: `hidden_dim`, `cond_dim`, `n_blocks`, `n_heads`, `model_length`,
  `vocab_size`, `adaln`, `causal`, `time_conditioning`, `block_size`, `sampling_eps_min/max`, ...), whose tensors
  carry the `backbone.` prefix of `BD3LM.backbone` (plus the `sampling_eps_min/max` buffers of `BD3LM` itself);
- the training (Hydra) config the originals' `DIT(config, vocab_size)` is built from, either bare (sections
  `model`, `algo`, ...) or wrapped as `{"config": {...}, "vocab_size": V, "mask_index": m}` (the dlmjax golden
  fixtures); its tensors are the DiT's own, without prefix.
Tensor names are accepted with or without `backbone.` whatever the config; `meta["prefix"]` says which the
checkpoint used, and `to_hf(..., prefix=meta["prefix"])` writes the same names back.

What `adaln` means differs between the two originals, and both are reproduced:
- training `DIT` (bd3lms models/dit.py): modulation exists iff `not causal or model.adaln`, with
  `causal = model.causal_attention` (default: `algo.parameterization == 'ar'`). A non-causal model always has it,
  so the tiny BD3 fixture's `"adaln": false` has no effect (its checkpoint has every adaLN tensor);
- HF `BD3LM` (models/hf): `adaln` is taken literally (False: no sigma_map and no modulation tensors).
The dlmjax DiT is bidirectional, so causal (AR) checkpoints are refused.

Layout: torch `Linear.weight [out, in]` <-> Flax `kernel [in, out]`; `attn_qkv.weight [3D, D]` <-> `[D, 3, D]`;
`blocks.{i}` <-> `blocks_{i}`, `mlp.{j}` <-> `mlp_{j}`. Every conversion is a transpose or reshape, so import then
export gives back the same bits. `rotary_emb.inv_freq` (a buffer, checked against `rope_theta`) and BD3's
`sampling_eps_min/max` are passed through untouched.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import numpy as np

from dlmjax.config import ConfigError, ModelConfig
from dlmjax.interchange.common import Entry, get_key, params_to_tensors, tensors_to_params
from dlmjax.interchange.errors import InterchangeError

ARCHES = ("mdlm", "bd3lm")
HF_PREFIX = "backbone."
ROTARY_BUFFER = "rotary_emb.inv_freq"
# Buffers of the HF `BD3LM` wrapper itself (var_min=True), outside `backbone.`.
CLIP_BUFFERS = ("sampling_eps_min", "sampling_eps_max")
ROPE_THETA = 10000.0  # `Rotary(dim, base=10_000)`: the originals never change it
TIME_FREQUENCIES = 256
GPT2_VOCAB_WITH_MASK = 50258  # GPT-2's 50257 ids + [MASK] appended last
GPT2_EOS = 50256


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise InterchangeError(f"--arch {arch!r} is not handled by the DiT converter; it handles {list(ARCHES)}")


def _hydra_sections(hf_config: dict) -> tuple[dict, dict, dict, dict | None]:
    """(model, algo, root, wrapper) of a training config, bare or wrapped as the golden fixtures wrap it."""
    wrapper = None
    root = hf_config
    if isinstance(hf_config.get("config"), dict):
        wrapper, root = hf_config, hf_config["config"]
    model = root.get("model")
    if not isinstance(model, dict):
        raise InterchangeError("config.json: `model` must be a mapping (training layout) or the file must use the "
                               "HF layout with `hidden_dim`; found neither")
    algo = root.get("algo") if isinstance(root.get("algo"), dict) else {}
    return model, algo, root, wrapper


def model_config(hf_config: dict, arch: str) -> tuple[ModelConfig, dict]:
    """ModelConfig of the checkpoint's DiT, plus `meta` (special ids, BD3 block size and clip, prefix).

    meta: `mask_id` (the fixture's `mask_index`, else `vocab_size - 1`: MDLM/BD3 append [MASK] last), `eos_id` /
    `bos_id` (GPT-2's 50256 when the vocabulary is GPT-2's plus [MASK], else None), `pad_id` (None: with GPT-2
    the originals' added [PAD] gets id 50257, the mask's id), `block_size` (bd3lm), `clip_min` / `clip_max` (bd3lm
    `sampling_eps_min/max` from the config when present; the HF checkpoint's buffers of the same names are the
    trained values and come back in `to_params`' passthrough), `schedule` ("loglinear"), `prefix` (tensor name
    prefix the layout implies: "backbone." for HF, "" for the training layout), `time_conditioning`, `layout`.
    """
    _check_arch(arch)
    if not isinstance(hf_config, dict):
        raise InterchangeError(f"config.json must hold a JSON object, got {type(hf_config).__name__}")
    meta: dict = {"schedule": "loglinear", "eos_id": None, "bos_id": None, "pad_id": None, "block_size": None}
    if "hidden_dim" in hf_config:  # HF wrapper (BD3LMConfig and the MDLM hub config)
        c, where = hf_config, "config.json"
        meta["layout"], meta["prefix"] = "hf", HF_PREFIX
        d_model, cond_dim = get_key(c, "hidden_dim", where=where), get_key(c, "cond_dim", where=where)
        n_layers, n_heads = get_key(c, "n_blocks", where=where), get_key(c, "n_heads", where=where)
        length, vocab = get_key(c, "model_length", where=where), get_key(c, "vocab_size", where=where)
        time_conditioning = bool(c.get("time_conditioning", False))
        adaln = bool(c.get("adaln", True))
        if c.get("causal", False):
            raise InterchangeError(f"config.json: causal={c['causal']!r} (an autoregressive DiT) is not supported; "
                                   "the dlmjax DiT is bidirectional (causal=false)")
        block_size = c.get("block_size")
        clip = {k: c[k] for k in CLIP_BUFFERS if k in c}
        mask_id = c.get("mask_token_id", vocab - 1)
    else:
        model, algo, root, wrapper = _hydra_sections(hf_config)
        where = "config.json model"
        meta["layout"], meta["prefix"] = "training", ""
        d_model, cond_dim = get_key(model, "hidden_size", where=where), get_key(model, "cond_dim", where=where)
        n_layers, n_heads = get_key(model, "n_blocks", where=where), get_key(model, "n_heads", where=where)
        length = get_key(model, "length", where=where)
        vocab = get_key(wrapper if wrapper is not None else root, "vocab_size")
        parameterization = algo.get("parameterization", root.get("parameterization", "subs"))
        if parameterization != "subs":
            raise InterchangeError(f"config.json: parameterization={parameterization!r} is not supported; "
                                   "the DiT converter handles the SUBS (masked diffusion) models only")
        time_conditioning = bool(algo.get("time_conditioning", root.get("time_conditioning", False)))
        causal = bool(model.get("causal_attention", parameterization == "ar"))
        if causal:
            raise InterchangeError("config.json: model.causal_attention=true (an autoregressive DiT) is not "
                                   "supported; the dlmjax DiT is bidirectional")
        # bd3lms DIT: `self.adaLN = not self.causal or model.adaln`, i.e. always on for a bidirectional model.
        adaln = True
        block_size = root.get("block_size")
        training = root.get("training", {}) if isinstance(root.get("training"), dict) else {}
        clip = {k: training[k] for k in CLIP_BUFFERS if k in training}
        mask_id = (wrapper or {}).get("mask_index", vocab - 1)
    if arch == "bd3lm":
        if block_size is None:
            raise InterchangeError("config.json: block_size is missing; --arch bd3lm needs the block length")
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1 or length % block_size:
            raise InterchangeError(f"config.json: block_size={block_size!r} must be a positive divisor of the "
                                   f"model length {length}")
        meta["block_size"] = block_size
        if clip:
            meta["clip_min"] = float(clip.get("sampling_eps_min", 1e-3))
            meta["clip_max"] = float(clip.get("sampling_eps_max", 1.0))
    if not isinstance(mask_id, int) or not 0 <= mask_id < vocab:
        raise InterchangeError(f"config.json: mask id {mask_id!r} must be a token id in [0, vocab_size={vocab})")
    meta["mask_id"] = mask_id
    if vocab == GPT2_VOCAB_WITH_MASK:
        meta["eos_id"] = meta["bos_id"] = GPT2_EOS
    meta["time_conditioning"] = time_conditioning
    try:
        cfg = ModelConfig(arch="dit", vocab_size=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                          mlp_hidden=4 * d_model, max_seq_len=length, rope_theta=ROPE_THETA, norm_eps=1e-5,
                          tie_embeddings=False, cond_dim=cond_dim, time_conditioning=time_conditioning, adaln=adaln)
    except ConfigError as e:
        raise InterchangeError(f"config.json does not give a valid DiT: {e}") from e
    return cfg, meta


# ---------------------------------------------------------------------------------------------------------------
# Tensor layout


def _entries(cfg: ModelConfig, prefix: str) -> list[Entry]:
    """Every parameter as a (HF tensor, dlmjax path) entry. `attn_qkv` is listed as the transpose [D, 3D];
    `to_params` / `to_hf` reshape it to / from the DiT's [D, 3, D]."""
    d, c, v, f = cfg.d_model, cfg.cond_dim, cfg.vocab_size, cfg.mlp_hidden
    rows: list[Entry] = []

    def linear(hf: str, path: tuple[str, ...], out_features: int, in_features: int, bias: bool = True):
        rows.append(Entry(f"{prefix}{hf}.weight", (out_features, in_features), path + ("kernel",), linear=True))
        if bias:
            rows.append(Entry(f"{prefix}{hf}.bias", (out_features,), path + ("bias",)))

    def gain(hf: str, path: tuple[str, ...]):
        rows.append(Entry(f"{prefix}{hf}.weight", (d,), path + ("weight",)))

    rows.append(Entry(f"{prefix}vocab_embed.embedding", (v, d), ("vocab_embed", "embedding")))
    if cfg.adaln:
        linear("sigma_map.mlp.0", ("sigma_map", "mlp_0"), c, TIME_FREQUENCIES)
        linear("sigma_map.mlp.2", ("sigma_map", "mlp_2"), c, c)
    for i in range(cfg.n_layers):
        hf, fx = f"blocks.{i}", (f"blocks_{i}",)
        gain(f"{hf}.norm1", fx + ("norm1",))
        gain(f"{hf}.norm2", fx + ("norm2",))
        linear(f"{hf}.attn_qkv", fx + ("attn_qkv",), 3 * d, d, bias=False)
        linear(f"{hf}.attn_out", fx + ("attn_out",), d, d, bias=False)
        linear(f"{hf}.mlp.0", fx + ("mlp_0",), f, d)
        linear(f"{hf}.mlp.2", fx + ("mlp_2",), d, f)
        if cfg.adaln:
            linear(f"{hf}.adaLN_modulation", fx + ("adaLN_modulation",), 6 * d, c)
    gain("output_layer.norm_final", ("output_layer", "norm_final"))
    linear("output_layer.linear", ("output_layer", "linear"), v, d)
    if cfg.adaln:
        linear("output_layer.adaLN_modulation", ("output_layer", "adaLN_modulation"), 2 * d, c)
    return rows


def _detect_prefix(names: Iterable[str], arch: str) -> str:
    names = [n for n in names if n not in CLIP_BUFFERS]
    prefixed = [n for n in names if n.startswith(HF_PREFIX)]
    if prefixed and len(prefixed) != len(names):
        bare = sorted(set(names) - set(prefixed))[:5]
        raise InterchangeError(f"{arch} checkpoint mixes {HF_PREFIX!r}-prefixed and bare tensor names (bare: {bare}); "
                               "expected all of one kind")
    return HF_PREFIX if prefixed else ""


def expected_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The reference's `Rotary.inv_freq` buffer, float32 [Dh/2]: 1 / theta^(arange(0, Dh, 2) / Dh)."""
    dh = cfg.head_dim
    exponent = np.arange(0, dh, 2, dtype=np.float32) / np.float32(dh)
    return (1.0 / (np.float32(cfg.rope_theta) ** exponent)).astype(np.float32)


def to_params(read: Callable[[str], np.ndarray], names: Iterable[str], cfg: ModelConfig, arch: str):
    """Checkpoint tensors -> (Flax params of `DiT(cfg)` as nested dicts of np.ndarray, passthrough tensors).

    Tensor names may carry the HF wrapper's `backbone.` prefix or none. Arrays keep the checkpoint's dtype (only
    transposed / reshaped). Passthrough: `rotary_emb.inv_freq` (checked against `cfg.rope_theta` to 1e-6 relative,
    since the DiT recomputes it) and BD3's `sampling_eps_min/max`. Raises InterchangeError naming the tensor, its
    shape and the expected shape for a missing tensor, a wrong shape, or a tensor the DiT does not know.
    """
    _check_arch(arch)
    names = list(names)
    prefix = _detect_prefix(names, arch)
    rotary = prefix + ROTARY_BUFFER
    keep = [f"^{re.escape(rotary)}$"] + [f"^{name}$" for name in CLIP_BUFFERS]
    params, passthrough = tensors_to_params(_entries(cfg, prefix), read, names, passthrough=keep, arch=arch)
    for i in range(cfg.n_layers):
        block = params[f"blocks_{i}"]["attn_qkv"]
        block["kernel"] = _qkv_to_dit(block["kernel"])
    if rotary in passthrough:
        inv_freq, want = passthrough[rotary], expected_inv_freq(cfg)
        if inv_freq.shape != want.shape:
            raise InterchangeError(f"{arch} checkpoint: tensor {rotary!r} has shape {list(inv_freq.shape)}; expected "
                                   f"{list(want.shape)} (head_dim {cfg.head_dim} / 2)")
        if not np.allclose(inv_freq.astype(np.float64), want, rtol=1e-6, atol=0):
            raise InterchangeError(f"{arch} checkpoint: tensor {rotary!r} is not 1 / {cfg.rope_theta:g}^(2k/"
                                   f"{cfg.head_dim}); the DiT recomputes rotary frequencies from model.rope_theta")
    return params, passthrough


def to_hf(params, cfg: ModelConfig, arch: str, *, prefix: str = "") -> dict[str, np.ndarray]:
    """Flax params of `DiT(cfg)` -> {HF name: array in HF layout}, in the checkpoint's tensor order.

    `prefix` is prepended to every name: pass `meta["prefix"]` from `model_config` ("backbone." for the HF
    wrapper). Buffers (`rotary_emb.inv_freq`, `sampling_eps_*`) are not parameters: the exporter adds the
    passthrough tensors (or `expected_inv_freq(cfg)` for a model that was never imported).
    """
    _check_arch(arch)
    if prefix not in ("", HF_PREFIX):
        raise InterchangeError(f"{arch} export: prefix={prefix!r} is not allowed; use '' or {HF_PREFIX!r}")
    flat = {f"blocks_{i}": dict(params[f"blocks_{i}"]) for i in range(cfg.n_layers) if f"blocks_{i}" in params}
    for name, block in flat.items():
        qkv = dict(block.get("attn_qkv", {}))
        if "kernel" in qkv:
            kernel = np.asarray(qkv["kernel"])
            if kernel.shape != (cfg.d_model, 3, cfg.d_model):
                raise InterchangeError(f"{arch} export: parameter {name}/attn_qkv/kernel has shape "
                                       f"{list(kernel.shape)}; expected {[cfg.d_model, 3, cfg.d_model]}")
            qkv["kernel"] = kernel.reshape(cfg.d_model, 3 * cfg.d_model)
        block["attn_qkv"] = qkv
    return params_to_tensors(_entries(cfg, prefix), dict(params, **flat), arch=arch)


def _qkv_to_dit(kernel: np.ndarray) -> np.ndarray:
    """[D, 3D] (the transposed torch weight: columns q | k | v) -> [D, 3, D]."""
    return kernel.reshape(kernel.shape[0], 3, kernel.shape[1] // 3)
