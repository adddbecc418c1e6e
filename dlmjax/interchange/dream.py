"""Dream checkpoints (Dream-org/Dream-v0-*-7B: a bidirectional Qwen2) and plain Hugging Face causal LMs of the
same network (`Qwen2ForCausalLM`, `LlamaForCausalLM`) <-> dlmjax `Transformer` with `model.arch dream`
(RMSNorm, rotary, grouped-query attention, SwiGLU, raw logits where row i predicts token i + 1).

    model.embed_tokens.weight                          [V, D]     -> wte
    model.layers.{i}.input_layernorm.weight            [D]        -> blocks_{i}/attn_norm/weight
    model.layers.{i}.self_attn.{q,k,v}_proj.weight     [out, D]   -> blocks_{i}/{q,k,v}_proj/kernel [D, out]
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       [out]      -> blocks_{i}/{q,k,v}_proj/bias (qkv_bias only)
    model.layers.{i}.self_attn.o_proj.weight           [D, H*Dh]  -> blocks_{i}/attn_out/kernel
    model.layers.{i}.post_attention_layernorm.weight   [D]        -> blocks_{i}/ff_norm/weight
    model.layers.{i}.mlp.{gate,up}_proj.weight         [F, D]     -> blocks_{i}/{ff_proj,up_proj}/kernel
    model.layers.{i}.mlp.down_proj.weight              [D, F]     -> blocks_{i}/ff_out/kernel
    model.norm.weight                                  [D]        -> ln_f/weight
    lm_head.weight                                     [V, D]     -> ff_out [D, V] (tied: kept verbatim if stored)

The config.json layouts read (`FAMILIES`, chosen by `model_type`; any other model_type is read as Dream's):

    Dream  (DreamModel)        q/k/v biases; the mask token is config.json's `mask_token_id`
    qwen2  (Qwen2ForCausalLM)  q/k/v biases (Qwen2 always has them); no mask token: `--mask-id N`
    llama  (LlamaForCausalLM)  no biases (`attention_bias` false -> `model.qkv_bias=False`); `--mask-id N`

A plain causal LM was never trained with a mask token, so the user names one (`dlmjax convert --from-hf DIR --arch
dream --mask-id N`, the `mask_id` argument of `model_config`): any embedding row in [0, vocab_size) that is not the
config's bos / eos / pad id. Which row is the user's decision: Qwen2's embedding has spare rows past its tokenizer
(Fast-dLLM v2 adapts Qwen2.5 with mask 151665, the first of them); an unused row starts as an untrained vector that
adaptation (`train.init_from`) learns. The id is recorded in the import manifest's meta and in the run config's
`diffusion.mask_id`, where `dlmjax sample` and `train.init_from` read it. The network is the one the causal LM
computes; attention is bidirectional unless the caller masks it (a bd3 run at block size 1 attends causally), and
the token shift (`shift_logits`, below) turns the causal LM's next-token rows into per-slot predictions.

Settings that would change the math and that dlmjax's Transformer does not have are refused with one line naming
the config.json key: `rope_scaling` other than null, a sliding window, `mlp_bias` true, LLaMA's `attention_bias`
true (it also puts a bias on o_proj), a `head_dim` other than hidden_size / num_attention_heads, an activation other
than silu.

The forward returns raw logits: row i predicts token i + 1. Samplers read position i from row i - 1 with
`dlmjax.models.transformer.shift_logits` (re-exported here).
"""
from __future__ import annotations

import dataclasses

from dlmjax.config import ModelConfig
from dlmjax.interchange.common import (Entry, get_key, require, token_id, transformer_to_hf,
                                       transformer_to_params)
from dlmjax.interchange.errors import InterchangeError
from dlmjax.models.transformer import shift_logits  # noqa: F401 (re-export: the Dream sampling convention)

ARCHES = ("dream",)
TAKES_MASK_ID = True  # model_config takes the user's mask id (`--mask-id`) for causal LMs that have none
PASSTHROUGH = (r"rotary_emb\.inv_freq$",)
# The keys whose ids the mask may not share: a mask that is also EOS would end generation wherever it is left.
SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class Family:
    """One config.json layout of the Qwen2 / LLaMA network.

    model_type: config.json's `model_type` (compared lower-cased) that selects this layout.
    architecture: the `architectures` entry it must list when it lists any (None: not checked).
    qkv_bias: whether q/k/v carry biases (`model.qkv_bias`).
    fixed: (key, supported values, default when absent): config.json settings the network fixes.
    mask_hint: how the user gives the mask id when config.json has no `mask_token_id`.
    """

    model_type: str
    architecture: str | None
    qkv_bias: bool
    fixed: tuple[tuple[str, tuple, object], ...]
    mask_hint: str


_COMMON = (("hidden_act", ("silu",), "silu"), ("rope_scaling", (None,), None), ("mlp_bias", (False,), False))
# Qwen2 (and Dream, a bidirectional Qwen2) always builds q/k/v with biases; its config has no switch for it.
_QWEN2 = _COMMON + (("use_sliding_window", (False,), False), ("attention_bias", (True,), True))
DREAM = Family("dream", None, True, _QWEN2,
               "a Dream config names its mask token; for a plain Qwen2 / LLaMA causal LM give --mask-id")
QWEN2 = Family("qwen2", "Qwen2ForCausalLM", True, _QWEN2,
               "Qwen2ForCausalLM has no mask token: give --mask-id")
# LLaMA's attention_bias puts biases on q, k, v and o_proj; dlmjax's attention output has none, so only false.
LLAMA = Family("llama", "LlamaForCausalLM", False, _COMMON + (("attention_bias", (False,), False),),
               "LlamaForCausalLM has no mask token: give --mask-id")
FAMILIES = {f.model_type: f for f in (DREAM, QWEN2, LLAMA)}


def family_of(hf: dict) -> Family:
    """The layout of config.json `hf`: by `model_type`; any other (or none) is read as Dream's, as before plain
    causal LMs were accepted (Dream's own "Dream", and the configs `hf_config` writes)."""
    model_type = hf.get("model_type")
    family = FAMILIES.get(model_type.lower() if isinstance(model_type, str) else None, DREAM)
    listed = hf.get("architectures")
    if family.architecture and isinstance(listed, list) and listed and family.architecture not in listed:
        raise InterchangeError(f"config.json: architectures={listed!r} is not supported for model_type "
                               f"{family.model_type}; supported: [{family.architecture!r}] (the causal LM with its "
                               f"output head)")
    return family


def _ids(hf: dict, key: str) -> list[int]:
    value = hf.get(key)
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def mask_token(hf: dict, vocab: int, family: Family, mask_id: int | None = None) -> int:
    """The mask id: config.json's `mask_token_id` or the user's `mask_id` (`--mask-id`; both: they must agree),
    an embedding row in [0, vocab) that is none of the config's bos / eos / pad ids."""
    ours = token_id(hf, "mask_token_id", vocab)
    if mask_id is None and ours is None:
        if family is DREAM:
            raise InterchangeError(f"config.json: key 'mask_token_id' is missing; it is required ({family.mask_hint})")
        raise InterchangeError(f"--mask-id is required for model_type {family.model_type} ({family.mask_hint} N, an "
                               f"embedding row in [0, {vocab}) that is not bos/eos/pad, e.g. an unused row past the "
                               f"tokenizer's vocabulary)")
    if mask_id is not None:
        if isinstance(mask_id, bool) or not isinstance(mask_id, int) or not 0 <= mask_id < vocab:
            raise InterchangeError(f"--mask-id {mask_id!r} is not a row of the embedding; give an id in [0, {vocab}) "
                                   f"(config.json vocab_size={vocab})")
        if ours is not None and ours != mask_id:
            raise InterchangeError(f"--mask-id {mask_id} differs from config.json's mask_token_id={ours}; drop "
                                   f"--mask-id (the checkpoint names its own mask token)")
    mask, source = (mask_id, f"--mask-id {mask_id}") if mask_id is not None else (ours, "mask_token_id")
    for key in SPECIAL_KEYS:
        if mask in _ids(hf, key):
            raise InterchangeError(f"config.json: {key}={hf[key]!r} equals {source}; the mask id must be a token of "
                                   f"its own, not bos / eos / pad")
    return mask


def model_config(hf: dict, arch: str = "dream", mask_id: int | None = None) -> tuple[ModelConfig, dict]:
    """ModelConfig and meta ({mask_id, eos_id, pad_id, bos_id, shift_logits}) from a Dream, Qwen2 or LLaMA
    config.json; `mask_id` is the user's `--mask-id` (required when config.json has no `mask_token_id`)."""
    family = family_of(hf)
    for key, allowed, default in family.fixed:
        require(hf, key, allowed, default=default)
    d_model = get_key(hf, "hidden_size")
    n_heads = get_key(hf, "num_attention_heads")
    n_kv_heads = get_key(hf, "num_key_value_heads", n_heads)
    if d_model % n_heads:
        raise InterchangeError(f"config.json: hidden_size={d_model} is not divisible by num_attention_heads={n_heads}")
    head_dim = get_key(hf, "head_dim", d_model // n_heads)
    if head_dim != d_model // n_heads:
        raise InterchangeError(f"config.json: head_dim={head_dim} is not supported; dlmjax needs hidden_size / "
                               f"num_attention_heads = {d_model // n_heads}")
    if n_heads % n_kv_heads:
        raise InterchangeError(f"config.json: num_key_value_heads={n_kv_heads} must divide "
                               f"num_attention_heads={n_heads}")
    vocab = get_key(hf, "vocab_size")
    tied = get_key(hf, "tie_word_embeddings", False, kind=bool)
    mask = mask_token(hf, vocab, family, mask_id)
    try:
        cfg = ModelConfig(
            arch="dream", qkv_bias=family.qkv_bias, vocab_size=vocab, d_model=d_model,
            n_layers=get_key(hf, "num_hidden_layers"), n_heads=n_heads,
            n_kv_heads=0 if n_kv_heads == n_heads else n_kv_heads, mlp_hidden=get_key(hf, "intermediate_size"),
            max_seq_len=get_key(hf, "max_position_embeddings", 2048),
            rope_theta=get_key(hf, "rope_theta", 10000.0, kind=float),
            norm_eps=get_key(hf, "rms_norm_eps", 1e-6, kind=float), tie_embeddings=tied,
            init_std=get_key(hf, "initializer_range", 0.02, kind=float))
    except ValueError as e:
        raise InterchangeError(f"config.json does not give a valid dlmjax model: {e}") from None
    meta = {"mask_id": mask, "eos_id": token_id(hf, "eos_token_id", vocab),
            "pad_id": token_id(hf, "pad_token_id", vocab), "bos_id": token_id(hf, "bos_token_id", vocab),
            "shift_logits": True}
    return cfg, meta


def entries(cfg: ModelConfig) -> list[Entry]:
    d, f, v = cfg.d_model, cfg.mlp_hidden, cfg.vocab_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = [Entry("model.embed_tokens.weight", (v, d), ("wte",))]
    for i in range(cfg.n_layers):
        b, p = f"model.layers.{i}.", f"blocks_{i}"
        out.append(Entry(b + "input_layernorm.weight", (d,), (p, "attn_norm", "weight")))
        for name, width in (("q", q), ("k", kv), ("v", kv)):
            out.append(Entry(b + f"self_attn.{name}_proj.weight", (width, d), (p, f"{name}_proj", "kernel"), True))
            if cfg.qkv_bias:  # LLaMA layouts have none (model.qkv_bias false)
                out.append(Entry(b + f"self_attn.{name}_proj.bias", (width,), (p, f"{name}_proj", "bias")))
        out += [
            Entry(b + "self_attn.o_proj.weight", (d, q), (p, "attn_out", "kernel"), True),
            Entry(b + "post_attention_layernorm.weight", (d,), (p, "ff_norm", "weight")),
            Entry(b + "mlp.gate_proj.weight", (f, d), (p, "ff_proj", "kernel"), True),
            Entry(b + "mlp.up_proj.weight", (f, d), (p, "up_proj", "kernel"), True),
            Entry(b + "mlp.down_proj.weight", (d, f), (p, "ff_out", "kernel"), True),
        ]
    out.append(Entry("model.norm.weight", (d,), ("ln_f", "weight")))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", (v, d), ("ff_out",), True))
    return out


def to_params(read, names, cfg: ModelConfig, arch: str = "dream") -> tuple[dict, dict]:
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding, which HF re-ties on load).
    passthrough = PASSTHROUGH + ((r"^lm_head\.weight$",) if cfg.tie_embeddings else ())
    return transformer_to_params(entries(cfg), read, names, cfg, passthrough=passthrough, arch=arch)


def to_hf(params, cfg: ModelConfig, arch: str = "dream") -> dict:
    return transformer_to_hf(entries(cfg), params, cfg, arch=arch)


def hf_config(cfg: ModelConfig, meta: dict) -> dict:
    """A Dream config.json for a dlmjax model that did not come from one (a model trained here).

    DreamModel always builds q/k/v biases, so a model without them (`model.qkv_bias` false, e.g. a run adapted from
    a LLaMA import) has no Dream config.json: refused, rather than written as a folder that would load with
    untrained biases. (An imported model exports through its import manifest, with its own config.json.)
    """
    if not cfg.qkv_bias:
        raise InterchangeError("model.qkv_bias=False: a Dream config.json (DreamModel) always has q/k/v biases, so "
                               "dlmjax writes one only for models with model.qkv_bias=true; a model imported with "
                               "`convert --from-hf` exports through its hf/manifest.json instead")
    return {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_act": "silu",
        "hidden_size": cfg.d_model, "intermediate_size": cfg.mlp_hidden, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.num_kv_heads,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "use_sliding_window": False,
        "sliding_window": None, "vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std,
        "mask_token_id": meta.get("mask_id"), "pad_token_id": meta.get("pad_id"),
        "eos_token_id": meta.get("eos_id"), "bos_token_id": meta.get("bos_id"),
        "torch_dtype": cfg.param_dtype, "use_cache": False,
    }
