"""Hugging Face checkpoint interchange: import released checkpoints into dlmjax and export them back.

    dlmjax convert --from-hf DIR --arch llada|dream|mdlm|bd3lm --out CKPT [--mask-id N]
    dlmjax convert --to-hf CKPT --out DIR

One module per architecture family does the mapping (`llada`, `dream`, `dit` for mdlm and bd3lm), each with

    ARCHES                                   the --arch names it handles
    model_config(hf_config, arch)            -> (ModelConfig, meta: mask/eos/pad/bos ids and arch extras)
                                                (`mask_id=N` too where TAKES_MASK_ID: the user's --mask-id)
    to_params(read, names, model_cfg, arch)  -> (params tree, passthrough {name: array})
    to_hf(params, model_cfg, arch)           -> {hf name: array in the Hugging Face layout}

This package reads the folder tensor by tensor (`safetensors_io`; the mapped file's pages of a tensor are let go once
it is placed, and its dtype is kept), builds a full, validated dlmjax `Config`, places each parameter straight into
its sharding on the mesh, and writes a params-only export (`dlmjax.checkpoint
.save_params`) plus `hf/`: the original config.json (and generation_config.json, index file), tensors dlmjax does
not use (`passthrough.safetensors`) and `manifest.json` (arch, meta, every tensor's name, dtype, shape and shard in
order). Export inverts the mapping, casts every tensor back to its recorded dtype and writes the recorded layout,
so import then export gives the original tensors bit for bit.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from dlmjax.config import Config, DataConfig, DiffusionConfig, ModelConfig, SampleConfig
from dlmjax.interchange.errors import InterchangeError
from dlmjax.interchange.safetensors_io import (CONFIG_FILE, DTYPES, GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE,
                                               HFCheckpoint, dtype_name, read_safetensors,
                                               write_safetensors)
from dlmjax.text import TOKENIZER_FILES

__all__ = ["ARCHES", "InterchangeError", "get_module", "import_hf", "convert_from_hf", "export_to_hf",
           "HF_DIR", "MANIFEST"]

# --arch name -> module implementing it, imported on first use (the DiT module pulls in its model).
MODULES = {"llada": "dlmjax.interchange.llada", "dream": "dlmjax.interchange.dream",
           "mdlm": "dlmjax.interchange.dit", "bd3lm": "dlmjax.interchange.dit"}
ARCHES = tuple(MODULES)
# The diffusion objective an imported checkpoint is trained / evaluated with.
OBJECTIVES = {"llada": "llada", "dream": "llada", "mdlm": "mdlm", "bd3lm": "bd3"}
HF_DIR, MANIFEST, PASSTHROUGH_FILE = "hf", "manifest.json", "passthrough.safetensors"
# Copied into `<checkpoint>/hf/` and written back on export: the model's configs and its tokenizer files, so the
# tokenizer travels with the checkpoint (`dlmjax.text.ReleaseText` reads it there).
COPIED_FILES = (CONFIG_FILE, GENERATION_CONFIG_FILE, INDEX_FILE) + TOKENIZER_FILES
# generation_config.json fields that become the imported config's `sample.*` proposal defaults.
GENERATION_DEFAULTS = ("temperature", "top_k", "top_p")
DEFAULT_SEQ_LEN = 1024  # data.seq_len of an imported model (capped at its context)
DATA_PATH_PLACEHOLDER = "<set data.path to fine-tune>"


def get_module(arch: str):
    """The module that maps `arch` (raises InterchangeError listing the allowed names)."""
    if arch not in MODULES:
        raise InterchangeError(f"--arch {arch!r} is not supported; choose one of {list(ARCHES)}")
    name = MODULES[arch]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise InterchangeError(f"--arch {arch}: its converter {name} is not available in this dlmjax") from None
    if arch not in getattr(module, "ARCHES", ()):
        raise InterchangeError(f"--arch {arch}: {name} handles {list(getattr(module, 'ARCHES', ()))}, not {arch!r}")
    return module


def sample_defaults(hf_dir: Path) -> dict:
    """The proposal defaults a release's generation_config.json sets (temperature, top_k, top_p), if any; a null
    or absent field keeps the sampler's reference default."""
    path = Path(hf_dir) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InterchangeError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    return {k: gen[k] for k in GENERATION_DEFAULTS if isinstance(gen, dict) and gen.get(k) is not None}


def build_config(model_cfg: ModelConfig, meta: dict, arch: str, sample: dict | None = None) -> Config:
    """A full dlmjax Config for an imported model: its objective, mask id, text-data defaults and the sampling
    defaults of its generation config."""
    objective = OBJECTIVES[arch]
    diffusion = {"objective": objective, "mask_id": int(meta["mask_id"])}
    seq_len = min(model_cfg.max_seq_len, DEFAULT_SEQ_LEN)
    if objective == "mdlm":
        diffusion["schedule"] = meta.get("schedule", "loglinear")
    elif objective == "bd3":
        block = int(meta.get("block_size") or 0)
        diffusion.update(block_size=block, clip_min=float(meta.get("clip_min", 1e-3)),
                         clip_max=float(meta.get("clip_max", 1.0)))
        if block:
            seq_len = max(block, seq_len // block * block)
    try:
        return Config(model=model_cfg, diffusion=DiffusionConfig(**diffusion),
                      data=DataConfig(kind="text", path=DATA_PATH_PLACEHOLDER, seq_len=seq_len, batch_size=8),
                      sample=SampleConfig(**(sample or {})))
    except ValueError as e:
        raise InterchangeError(f"--arch {arch}: the imported settings do not form a valid dlmjax config: {e}") from None


def _with_checkpoint_dtype(model_cfg: ModelConfig, ckpt: HFCheckpoint) -> ModelConfig:
    """bfloat16 parameters and activations when every floating tensor is BF16 (the released LLaDA / Dream),
    float32 parameters otherwise (F32 exactly; F16 / F64 widen or round through float32 and are cast back on export)."""
    floats = {t.dtype for t in ckpt.tensors.values() if t.dtype.startswith(("F", "BF"))}
    if floats == {"BF16"}:
        return dataclasses.replace(model_cfg, param_dtype="bfloat16", dtype="bfloat16")
    return dataclasses.replace(model_cfg, param_dtype="float32")


def _flat(tree) -> dict:
    from flax import traverse_util  # noqa: PLC0415

    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def place_params(params: dict, model_cfg: ModelConfig, mesh=None, rules=None, release=None) -> dict:
    """Check `params` (host arrays, dlmjax layout) against the model and put each one, cast to
    `model.param_dtype`, straight into its sharding on `mesh` (default: this process's first device, as
    `dlmjax.load` does) under the logical-axis `rules` (default: `dlmjax.sharding.LOGICAL_RULES`), one tensor at a
    time: the host never holds a second copy of the model. `release(array)`, if given, is called with each host
    array once its copy is on the devices (`HFCheckpoint.release`: the mapped file's pages go as they are used)."""
    import flax.linen as nn  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import traverse_util  # noqa: PLC0415

    from dlmjax.config import MeshConfig  # noqa: PLC0415
    from dlmjax.models.transformer import build_model  # noqa: PLC0415
    from dlmjax.sharding import LOGICAL_RULES, logical_to_sharding, make_mesh  # noqa: PLC0415

    boxed = jax.eval_shape(lambda: build_model(model_cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    if mesh is None:  # one copy: a mesh over every device would replicate the model on each of them
        mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices()[:1])
    like = nn.unbox(boxed["params"])
    shardings = _flat(logical_to_sharding(nn.get_partition_spec(boxed)["params"], mesh,
                                          LOGICAL_RULES if rules is None else rules, shapes=like))
    like = _flat(like)
    got = _flat(params)
    missing = sorted("/".join(k) for k in like.keys() - got.keys())
    extra = sorted("/".join(k) for k in got.keys() - like.keys())
    if missing or extra:
        raise InterchangeError(f"converted parameters do not fit model.arch={model_cfg.arch}: missing {missing[:5]}, "
                               f"unexpected {extra[:5]}")
    placed = {}
    for key, want in like.items():
        a = got.pop(key)
        if tuple(a.shape) != tuple(want.shape):
            raise InterchangeError(f"parameter {'/'.join(key)} has shape {list(a.shape)}; the model expects "
                                   f"{list(want.shape)}")
        placed[key] = jax.device_put(np.asarray(a).astype(want.dtype, copy=False), shardings[key])
        if release is not None:
            placed[key].block_until_ready()  # the copy has read `a`
            release(a)
        del a
    return traverse_util.unflatten_dict(placed)


def _import(hf_dir, arch: str, mesh=None, mask_id: int | None = None):
    module = get_module(arch)
    # Only a module that reads plain causal LMs (no mask token of their own) takes the user's mask id.
    if mask_id is not None and not getattr(module, "TAKES_MASK_ID", False):
        raise InterchangeError(f"--mask-id applies to --arch dream (plain Qwen2 / LLaMA causal LMs); --arch {arch} "
                               f"reads its mask token from config.json")
    ckpt = HFCheckpoint(hf_dir)
    extra = {} if mask_id is None else {"mask_id": mask_id}
    model_cfg, meta = module.model_config(ckpt.config, arch, **extra)
    model_cfg = _with_checkpoint_dtype(model_cfg, ckpt)
    cfg = build_config(model_cfg, meta, arch, sample_defaults(ckpt.directory))
    host_params, passthrough = module.to_params(ckpt.read, ckpt.names, model_cfg, arch)
    ckpt.release()  # the finite check read every tensor; placing reads each again, one at a time
    params = place_params(host_params, model_cfg, mesh, release=ckpt.release)
    del host_params
    return ckpt, cfg, params, meta, passthrough


def import_hf(hf_dir, arch: str, mesh=None, *, mask_id: int | None = None):
    """(Config, params on the mesh, meta) for the Hugging Face checkpoint folder `hf_dir` of architecture `arch`;
    `mask_id` (`--mask-id`) names the mask token of a plain causal LM (`dlmjax.interchange.dream`)."""
    ckpt, cfg, params, meta, _ = _import(hf_dir, arch, mesh, mask_id)
    ckpt.close()
    return cfg, params, meta


def _manifest(ckpt: HFCheckpoint, arch: str, meta: dict, passthrough: dict, copied: list[str]) -> dict:
    return {
        "format": "dlmjax-hf-manifest", "version": 1, "arch": arch, "source": str(Path(ckpt.directory).absolute()),
        "meta": meta, "index_file": INDEX_FILE if ckpt.index is not None else None, "copied_files": copied,
        "passthrough": list(passthrough),
        "shards": [{"file": s.file, "metadata": s.metadata,
                    "tensors": [{"name": n, "dtype": ckpt.tensors[n].dtype, "shape": list(ckpt.tensors[n].shape)}
                                for n in s.names]} for s in ckpt.shards],
    }


def check_new_output(out, flag: str = "--out") -> Path:
    """`out` made absolute, if it is a folder that does not exist yet or is empty; otherwise InterchangeError
    naming `flag` and the folder (nothing of a user's is ever overwritten or mixed into)."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InterchangeError(f"{flag} {out} is a file; give a new folder (it is created) or an empty one")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held:
        what = ("already holds a converted checkpoint" if {"params", HF_DIR} & set(held) else
                f"is a folder that is not empty (it holds {held[:3]}{' ...' if len(held) > 3 else ''})")
        raise InterchangeError(f"{flag} {out} {what}; give a new folder (it is created) or an empty one: nothing in "
                               f"an existing folder is overwritten")
    return out


def _host_mesh():
    """A one-device mesh on this process's CPU device."""
    import jax  # noqa: PLC0415

    from dlmjax.config import MeshConfig  # noqa: PLC0415
    from dlmjax.sharding import make_mesh  # noqa: PLC0415

    return make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1), jax.local_devices(backend="cpu")[:1])


def convert_from_hf(hf_dir, arch: str, out, mesh=None, *, mask_id: int | None = None) -> Path:
    """Import `hf_dir` and write a params-only export at `out` (+ `out/hf/` for a faithful export later).

    `mask_id` (`--mask-id`): the mask token of a plain causal LM, which has none in its config.json (`--arch dream`
    with a Qwen2ForCausalLM / LlamaForCausalLM folder); recorded in the manifest's meta and `diffusion.mask_id`.

    `out` must be new or empty (checked before anything is read). The export is written into a hidden sibling
    folder and renamed to `out` when complete, so a failed or interrupted conversion leaves no partial `out`.
    """
    out = check_new_output(out)
    if mesh is None:  # conversion only writes the parameters: host memory, even on an accelerator host (an 8B model
        mesh = _host_mesh()  # in bf16 is 16 GB, more than one v5e chip holds)
    ckpt, cfg, params, meta, passthrough = _import(hf_dir, arch, mesh, mask_id)
    staging = out.parent / f".{out.name}.converting-{os.getpid()}"
    try:
        hf_out = staging / HF_DIR
        hf_out.mkdir(parents=True)
        copied = []
        for name in COPIED_FILES:
            if (ckpt.directory / name).is_file():
                shutil.copyfile(ckpt.directory / name, hf_out / name)
                copied.append(name)
        if passthrough:
            specs = [(n, dtype_name(a.dtype), tuple(a.shape)) for n, a in passthrough.items()]
            write_safetensors(hf_out / PASSTHROUGH_FILE, specs, passthrough.__getitem__)
        (hf_out / MANIFEST).write_text(json.dumps(_manifest(ckpt, arch, meta, passthrough, copied), indent=1))
        ckpt.close()
        from dlmjax.checkpoint import save_params  # noqa: PLC0415

        save_params(staging, cfg, params)
        staging.rename(out)  # atomic; replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _read_manifest(ckpt: Path) -> dict | None:
    path = ckpt / HF_DIR / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def _default_meta(cfg: Config) -> dict:
    from dlmjax.data.tokenizer import ByteTokenizer  # noqa: PLC0415

    meta = {"mask_id": cfg.diffusion.mask_id, "eos_id": None, "pad_id": None, "bos_id": None}
    if cfg.model.vocab_size == ByteTokenizer.vocab_size:  # trained here on the byte tokenizer
        meta.update(eos_id=ByteTokenizer.eos_id, pad_id=ByteTokenizer.pad_id, bos_id=ByteTokenizer.bos_id)
    return meta


def imported_token_ids(ckpt) -> dict | None:
    """The token ids ({mask_id, eos_id, pad_id, bos_id, ...}, None where the original had none) that the import
    manifest of a `convert --from-hf` export recorded from the original config.json; None if `ckpt` was not
    imported (`dlmjax.inference.special_tokens` then asks the run's tokenizer)."""
    path = Path(ckpt)
    manifest = _read_manifest(path) if path.is_dir() else None
    if manifest is None:
        return None
    return {k: v for k, v in manifest.get("meta", {}).items() if k.endswith("_id")}


def export_to_hf(ckpt, out) -> Path:
    """Write the dlmjax checkpoint `ckpt` (an export from `convert --from-hf`, or any `dlmjax.checkpoint.load`
    path of a llada/dream model) as a Hugging Face folder `out`.

    With the `hf/` manifest of an import: the recorded tensor names, order, dtypes, shards, index and config files;
    otherwise one float `model.safetensors` and a config.json generated from the dlmjax config. `out` must be new
    or empty (checked first); it is written under a hidden sibling name and renamed when complete.
    """
    from dlmjax.checkpoint import load  # noqa: PLC0415

    ckpt, out = Path(ckpt), check_new_output(out)
    manifest = _read_manifest(ckpt)
    cfg, params = load(ckpt)
    if manifest is None:
        arch = cfg.model.arch
        if arch not in ("llada", "dream"):
            raise InterchangeError(f"{ckpt} has no {HF_DIR}/{MANIFEST} (it was not imported from Hugging Face) and "
                                   f"model.arch={arch} has no generated config.json; only llada and dream do")
        module = get_module(arch)
        tensors = module.to_hf(params, cfg.model, arch)
        dtype = "BF16" if cfg.model.param_dtype == "bfloat16" else "F32"
        manifest = {"arch": arch, "index_file": None, "copied_files": [], "passthrough": [],
                    "shards": [{"file": SINGLE_FILE, "metadata": {"format": "pt"},
                                "tensors": [{"name": n, "dtype": dtype, "shape": list(a.shape)}
                                            for n, a in tensors.items()]}]}
        generated = {CONFIG_FILE: json.dumps(module.hf_config(cfg.model, _default_meta(cfg)), indent=2) + "\n"}
        passthrough = {}
    else:
        arch = manifest["arch"]
        module = get_module(arch)
        # A module whose names depend on the checkpoint (the DiT's optional `backbone.`) records it in meta.
        prefix = {"prefix": manifest["meta"]["prefix"]} if "prefix" in manifest.get("meta", {}) else {}
        tensors = module.to_hf(params, cfg.model, arch, **prefix)
        generated = {}
        passthrough = {}
        if manifest["passthrough"]:
            passthrough = read_safetensors(ckpt / HF_DIR / PASSTHROUGH_FILE)

    recorded = [t for s in manifest["shards"] for t in s["tensors"]]
    names = {t["name"] for t in recorded}
    have = set(tensors) | set(passthrough)
    missing, unexpected = sorted(names - have), sorted(have - names)
    if missing or unexpected:
        raise InterchangeError(f"export: the model gives tensors that do not match {ckpt / HF_DIR / MANIFEST}: "
                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for t in recorded:  # check every shape before writing anything
        a = tensors.get(t["name"], passthrough.get(t["name"]))
        if list(a.shape) != t["shape"]:
            raise InterchangeError(f"export: tensor {t['name']!r} has shape {list(a.shape)}; the imported checkpoint "
                                   f"had {t['shape']}")

    def get(name, dtype):
        a = tensors[name] if name in tensors else passthrough[name]
        return np.asarray(a).astype(DTYPES[dtype], copy=False)

    staging = out.parent / f".{out.name}.exporting-{os.getpid()}"
    try:
        staging.mkdir(parents=True)
        for shard in manifest["shards"]:
            specs = [(t["name"], t["dtype"], tuple(t["shape"])) for t in shard["tensors"]]
            dtypes = {t["name"]: t["dtype"] for t in shard["tensors"]}
            write_safetensors(staging / shard["file"], specs, lambda n: get(n, dtypes[n]), shard["metadata"])
        for name in manifest["copied_files"]:
            shutil.copyfile(ckpt / HF_DIR / name, staging / name)
        for name, text in generated.items():
            (staging / name).write_text(text)
        staging.rename(out)  # atomic; replaces `out` only if it is an empty folder
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def forward_logits(cfg: Config, params, input_ids, sigma=None) -> np.ndarray:
    """float32 raw logits [B, L, V] of one forward pass (what `dlmjax forward` writes).

    Args:
      input_ids: int [B, L] or [L] (one row).
      sigma: DiT models only (model.arch dit): the noise level per row, [B] or a scalar.
    A bd3 model (diffusion.objective bd3) given 2 x its length (`data.seq_len` or `model.max_seq_len`) reads the
    input as `[x_t ; x_0]` under the BD3 training mask, both halves at positions 0..L-1, and returns all 2L rows
    (the first L are the x_t predictions). No logit shift is applied (Dream: see `dlmjax.models.transformer
    .shift_logits`).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from dlmjax.diffusion.block import two_stream_inputs  # noqa: PLC0415
    from dlmjax.errors import InputError  # noqa: PLC0415
    from kernels_pallas.masks import Bd3Training, Full  # noqa: PLC0415
    from dlmjax.models.transformer import build_model  # noqa: PLC0415

    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"input ids must be integers of shape [batch, length] or [length]; got {ids.dtype} "
                         f"{list(np.shape(input_ids))}")
    vocab = cfg.model.vocab_size
    if ids.min() < 0 or ids.max() >= vocab:
        raise InputError(f"input ids must be in [0, model.vocab_size={vocab}); got min {ids.min()}, max {ids.max()}")
    b, n = ids.shape
    kwargs = {}
    if sigma is not None:
        if cfg.model.arch != "dit":
            raise InputError(f"--sigma applies to DiT models (model.arch=dit: mdlm / bd3lm imports); this checkpoint "
                             f"has model.arch={cfg.model.arch}, whose forward takes no noise level")
        try:
            s = np.asarray(sigma, np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise InputError(f"sigma must be numbers (one per row or one scalar); got {sigma!r}") from None
        if not np.isfinite(s).all():
            raise InputError(f"sigma must be finite; got {s.tolist()[:8]}")
        if s.size == 1:
            s = np.broadcast_to(s, (b,))
        if s.shape != (b,):
            raise InputError(f"sigma must hold one value per row ([{b}]) or one scalar; got shape "
                             f"{list(np.shape(sigma))}")
        kwargs["sigma"] = jnp.asarray(s)
    mask = Full()
    if cfg.diffusion.objective == "bd3" and n % 2 == 0 and n // 2 in (cfg.data.seq_len, cfg.model.max_seq_len):
        half = n // 2
        mask = Bd3Training(half, cfg.diffusion.block_size or half)
        _, kwargs["positions"], _ = two_stream_inputs(ids[:, :half], ids[:, half:], np.ones((b, half), bool))
    elif n > cfg.model.max_seq_len:
        raise InputError(f"input length {n} exceeds the model's context model.max_seq_len={cfg.model.max_seq_len}")
    model = build_model(cfg.model, mask)
    logits = jax.jit(lambda p, t, kw: model.apply({"params": p}, t, **kw))(params, jnp.asarray(ids, jnp.int32), kwargs)
    return np.asarray(logits, np.float32)


def forward_to_file(checkpoint, input_ids_path, out, sigma_path=None) -> dict:
    """`dlmjax forward`: raw float32 logits of one forward pass over the ids in a .npy file, written to `out`."""
    from dlmjax.checkpoint import load  # noqa: PLC0415

    ids = _load_npy(input_ids_path, "--input-ids")
    sigma = _load_npy(sigma_path, "--sigma") if sigma_path else None
    cfg, params = load(checkpoint)
    logits = forward_logits(cfg, params, ids, sigma)
    np.save(out, logits)
    return {"out": str(out), "shape": list(logits.shape)}


def _load_npy(path, flag: str):
    from dlmjax.errors import InputError  # noqa: PLC0415

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(2, f"{flag} file {str(path)!r} does not exist", str(path)) from None
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} file {str(path)!r} is not a readable .npy array ({e})") from None
