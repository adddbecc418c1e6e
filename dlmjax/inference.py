"""The sampler front door: which sampler, with which settings and special tokens, for a checkpoint.

Everything that samples from a run goes through here: `dlmjax sample`, `dlmjax eval`, the training loop's final
evaluation and the notebook (`dlmjax.open_run`). Three questions get one answer each:

* Which token ids? `special_tokens(cfg, checkpoint)` reads them once: the mask id from the run's config, the
  others from the import manifest of a converted Hugging Face checkpoint (its `config.json` ids), else from the
  tokenizer the run was trained with (`data.tokenizer`: byte, a `tokenizer.json` or a SentencePiece model).
* Which sampler? A run trained with `diffusion.objective=bd3` samples with the block sampler (exact KV cache,
  blocks on the training grid, rows stop at their own EOS; commits fused into the next block's first forward, so
  AR costs one forward per token), with Fast-dLLM v2's sub-block rule when a sub-block length is asked for, or
  with D2F's pipelined sampler (several blocks in flight) when a window of blocks is (`--window-blocks`,
  `sample.window_blocks`); every other objective with the masked sampler (LLaDA / Fast-dLLM / Dream decoding).
* Which settings? `sampler_settings(cfg, tokens, prompt_len, request)`: the run's `sample.*` defaults, overridden
  by a `SampleRequest` (the user's flags), checked once; errors name the user's flag (`--gen-length`).

Text goes in and out through the checkpoint's own tokenizer (`Run.text`: a converted release's tokenizer files and
chat template, or the tokenizer a run was trained with), never a hard-coded one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from dlmjax.config import Config
from dlmjax.errors import SettingsError
from dlmjax.sampling import (BlockSamplerSettings, Denoiser, PipelineSettings, SamplerSettings, generate_blocks,
                             generate_blocks_uncached, generate_masked, generate_pipelined,
                             generate_pipelined_uncached)
from dlmjax.sampling.api import check_token_rows
from dlmjax.sampling.api import generate as generate_rows
from dlmjax.sampling.choices import BLOCK_CONFIDENCES, CacheKind, Confidence
from dlmjax.sampling.tokens import SpecialTokens
from dlmjax.text import ReleaseText, RunText, generated_text

# Where a training run keeps a copy of the tokenizer file it was trained with (so that the run samples text
# after the original file has moved); `dlmjax train` writes it, `run_tokenizer` reads it first.
TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """What a user asks of the sampler, in the sampler's words; None keeps the run's default (`sample.*`).

    The CLI fills it from its flags (`--gen-length` is `gen_length`, and so on), so an error about a field can be
    reported as the flag the user typed (`flag_of`).
    """

    gen_length: int | None = None
    steps: int | None = None
    block_length: int | None = None
    steps_per_block: int | None = None
    remasking: str | None = None
    temperature: float | None = None
    cfg_scale: float | None = None
    cache: str | None = None
    threshold: float | None = None
    factor: float | None = None
    entropy_bound: float | None = None
    alg: str | None = None
    alg_temp: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_at_eos: bool | None = None
    sub_block_length: int | None = None
    window_blocks: int | None = None
    block_add_threshold: float | None = None
    decoded_token_threshold: float | None = None

    def given(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


# The masked sampler's own parameters: a block-diffusion run refuses them instead of ignoring them. The parallel
# commit rules (`threshold`, `factor`) are not among them: the block sampler takes them as its commit rule.
MASKED_ONLY = ("cfg_scale", "cache", "alg", "alg_temp")
# The block samplers' own parameters, refused by the masked sampler.
BLOCK_ONLY = ("steps_per_block", "sub_block_length", "window_blocks", "block_add_threshold", "decoded_token_threshold")
# D2F's pipelined sampler commits by `threshold` (its skip threshold) only.
PIPELINE_ONLY = ("block_add_threshold", "decoded_token_threshold")
PIPELINE_REFUSES = ("steps_per_block", "factor", "entropy_bound", "sub_block_length")


def flag_of(field: str) -> str:
    """The command-line flag of a `SampleRequest` / settings field: `gen_length` -> `--gen-length`."""
    return "--" + field.replace("_", "-")


def uses_block_sampler(cfg: Config) -> bool:
    return cfg.diffusion.objective == "bd3"


def sampler_name(settings) -> str:
    """The sampler a settings object runs, as reports name it: block, pipelined (D2F) or masked."""
    if isinstance(settings, BlockSamplerSettings):
        return "block"
    return "pipelined" if isinstance(settings, PipelineSettings) else "masked"


# -- special tokens and the tokenizer ---------------------------------------------------------------------------


def run_tokenizer(cfg: Config, checkpoint: str | Path | None = None):
    """The tokenizer a run was trained with (None for a converted checkpoint that carries no tokenizer).

    `data.tokenizer` names it: `byte`, or a file. The copy the run keeps (`<workdir>/tokenizer/<file name>`) is
    read first, then the original path.
    """
    from dlmjax.data.tokenizer import ByteTokenizer, load_tokenizer  # noqa: PLC0415 (data is not a sampling need)

    spec = cfg.data.tokenizer
    if spec == "byte":
        return ByteTokenizer() if cfg.model.vocab_size == ByteTokenizer.vocab_size else None
    candidates = []
    if checkpoint is not None:
        root = _run_root(Path(checkpoint))
        candidates.append(root / TOKENIZER_DIR / Path(spec).name)
    candidates.append(Path(spec))
    for path in candidates:
        if path.is_file():
            return load_tokenizer(str(path))
    raise FileNotFoundError(2, f"the run's tokenizer (data.tokenizer={spec!r}) is not at "
                               f"{' or '.join(str(p) for p in candidates)}", str(candidates[-1]))


def _run_root(path: Path) -> Path:
    """The run directory of a workdir, its checkpoints/ folder or a step folder (params exports: the folder)."""
    for candidate in (path, *path.parents):
        if (candidate / "checkpoints").is_dir() or (candidate / "config.json").is_file():
            return candidate
    return path


def checkpoint_text(cfg: Config, checkpoint: str | Path | None = None):
    """How text goes in and out of a checkpoint: a converted release's own tokenizer files and chat template
    (`<checkpoint>/hf/`, `dlmjax.text.ReleaseText`), else the tokenizer the run was trained with
    (`dlmjax.text.RunText`), else None (token ids only)."""
    from dlmjax.interchange import HF_DIR, imported_token_ids  # noqa: PLC0415 (reads JSON files)

    if checkpoint is not None:
        release = ReleaseText.from_folder(Path(checkpoint).expanduser() / HF_DIR, imported_token_ids(checkpoint))
        if release is not None:
            return release
    tok = run_tokenizer(cfg, checkpoint)
    return None if tok is None else RunText(tok)


def special_tokens(cfg: Config, checkpoint: str | Path | None = None, text=None) -> SpecialTokens:
    """The checkpoint's token ids, read once.

    mask: `diffusion.mask_id`. BOS / EOS / pad: the import manifest of a `dlmjax convert --from-hf` export (the
    original config.json's ids), then the checkpoint's text interface (`text`, or `checkpoint_text`: a release's
    tokenizer files, or the run's tokenizer) for those config.json does not give; EoT: the token the release's chat
    template ends a message with. Unknown ids are None.
    """
    from dlmjax.interchange import imported_token_ids  # noqa: PLC0415 (reads one JSON file)

    ids = dict(imported_token_ids(checkpoint) or {}) if checkpoint is not None else {}
    text = text if text is not None else checkpoint_text(cfg, checkpoint)
    for name in ("bos_id", "eos_id", "pad_id", "eot_id"):
        if ids.get(name) is None and text is not None:
            ids[name] = getattr(text, name, None)
    ids = {k: v for k, v in ids.items() if k in ("bos_id", "eos_id", "eot_id", "pad_id") and v is not None}
    if ids.get("pad_id") == cfg.diffusion.mask_id:
        ids.pop("pad_id")  # a [MASK] fill would be denoised again; pad with EOS instead
    return SpecialTokens(mask_id=cfg.diffusion.mask_id, **ids)


# -- settings -------------------------------------------------------------------------------------------------


def sampler_settings(cfg: Config, tokens: SpecialTokens, prompt_len: int,
                     request: SampleRequest = SampleRequest()) -> SamplerSettings | BlockSamplerSettings:
    """The run's sampler settings for prompts of `prompt_len` slots (padding included).

    Defaults come from `sample.*`; unset lengths fill the rest of a training row (`data.seq_len - prompt_len`
    slots) one token per step. Raises `SettingsError` (with `.field`) on anything the sampler would refuse.
    """
    given = request.given()
    s = cfg.sample
    gen = given.get("gen_length", s.gen_length or (cfg.data.seq_len - prompt_len))
    # The proposal: the user's flags, else the run's `sample.*`, else the sampler's reference default.
    proposal = {**s.proposal_defaults(), **{k: given[k] for k in ("temperature", "top_k", "top_p") if k in given}}
    if gen <= 0:
        field = "gen_length" if "gen_length" in given else None
        raise SettingsError(f"the prompt ({prompt_len} tokens) fills the training row (data.seq_len="
                            f"{cfg.data.seq_len}); give a generation length (--gen-length / sample.gen_length)",
                            field=field)
    if uses_block_sampler(cfg):
        refused = [k for k in MASKED_ONLY if k in given and given[k] not in (CacheKind.NONE, 0, 0.0)]
        if refused:
            raise SettingsError(
                f"{' '.join(flag_of(k) for k in refused)}: this checkpoint (diffusion.objective=bd3) samples with the "
                "BD3 block sampler, which has an exact KV cache and no guidance; these belong to the masked sampler",
                field=refused[0])
        # The entropy-bounded rule ranks by entropy: its default remasking, and the one it allows.
        bounded = "entropy_bound" in given
        remasking = given.get("remasking", None if bounded else s.remasking)
        allowed = (*BLOCK_CONFIDENCES, Confidence.ENTROPY) if bounded else BLOCK_CONFIDENCES
        if remasking is not None and remasking not in allowed:
            raise SettingsError(f"--remasking={remasking!r} is not a block-sampler rule; choose one of "
                                f"{[str(c) for c in allowed]}", field="remasking")
        block = given.get("block_length", s.block_length or cfg.diffusion.block_size or cfg.data.seq_len)
        max_length = prompt_len + gen
        if max_length % block:
            raise SettingsError(
                f"prompt ({prompt_len} tokens) + gen_length ({gen}) = {max_length} is not a multiple of the block "
                f"length {block} (--block-length / sample.block_length, else diffusion.block_size); choose a "
                f"gen_length that ends the row on a block boundary, e.g. {gen + (-max_length % block)}",
                field="gen_length")
        window = given.get("window_blocks", s.window_blocks)
        if window is not None:
            return _pipeline_settings(given, max_length, block, window, remasking, tokens, proposal)
        stray = [k for k in PIPELINE_ONLY if k in given]
        if stray:
            raise SettingsError(f"{flag_of(stray[0])} is a setting of D2F's pipelined sampler; give --window-blocks "
                                "(blocks per forward, >= 2) to use it", field=stray[0])
        if "sub_block_length" in given:
            clash = [k for k in ("steps_per_block", "factor", "entropy_bound", "remasking") if k in given]
            if clash:
                raise SettingsError(f"--sub-block-length selects Fast-dLLM v2's decoding (confidence --threshold "
                                    f"inside the current sub-block); it takes no {flag_of(clash[0])}", field=clash[0])
            if block % given["sub_block_length"]:
                raise SettingsError(f"--sub-block-length={given['sub_block_length']} does not divide the block length "
                                    f"{block}; use one of {[d for d in range(1, block + 1) if block % d == 0]}",
                                    field="sub_block_length")
            return BlockSamplerSettings.v2(
                max_length=max_length, block_length=block, sub_block_length=given["sub_block_length"],
                threshold=given.get("threshold", 0.9), tokens=tokens, **proposal)
        return BlockSamplerSettings.bd3(
            max_length=max_length, block_length=block,
            steps_per_block=given.get("steps_per_block", s.steps_per_block), remasking=remasking,
            threshold=given.get("threshold"), factor=given.get("factor"), entropy_bound=given.get("entropy_bound"),
            fuse_commits=True, tokens=tokens, **proposal)
    if "steps_per_block" in given:
        raise SettingsError("--steps-per-block is the block sampler's (diffusion.objective=bd3 runs); the masked "
                            "sampler takes --steps over all blocks", field="steps_per_block")
    stray = [k for k in BLOCK_ONLY if k in given]
    if stray:
        raise SettingsError(f"{flag_of(stray[0])} belongs to the block samplers (diffusion.objective=bd3 runs); this "
                            f"checkpoint (diffusion.objective={cfg.diffusion.objective}) samples with the masked sampler",
                            field=stray[0])
    steps = given.get("steps", s.steps or gen)
    block = given.get("block_length", s.block_length or gen)
    common = dict(block_length=block, cfg_scale=given.get("cfg_scale", 0.0),
                  stop_at_eos=given.get("stop_at_eos", False), tokens=tokens, **proposal)
    if "alg" in given:
        clash = [k for k in ("cache", "factor", "entropy_bound", "remasking") if k in given
                 and given[k] != CacheKind.NONE]
        if clash:
            raise SettingsError(f"--alg selects Dream's decoding; it takes no {' or '.join(map(flag_of, clash))}",
                                field=clash[0])
        return SamplerSettings.dream(max_new_tokens=gen, steps=steps, alg=given["alg"],
                                     alg_temp=given.get("alg_temp", 0.0), threshold=given.get("threshold"),
                                     **common)
    remasking = given.get("remasking", None if "entropy_bound" in given else s.remasking)
    return SamplerSettings.llada(gen_length=gen, steps=steps, remasking=remasking,
                                 cache=given.get("cache", CacheKind.NONE), threshold=given.get("threshold"),
                                 factor=given.get("factor"), entropy_bound=given.get("entropy_bound"), **common)


def _pipeline_settings(given: dict, max_length: int, block: int, window: int, remasking, tokens: SpecialTokens,
                       proposal: dict) -> PipelineSettings:
    """D2F's pipelined sampler for a bd3 run: `window` blocks per forward, `--threshold` as its skip threshold."""
    clash = [k for k in PIPELINE_REFUSES if k in given]
    if clash:
        raise SettingsError(f"{flag_of(clash[0])}: D2F's pipelined sampler (--window-blocks) commits the slots with "
                            "confidence >= --threshold (at least one per pass in the first unfinished block); it "
                            "takes no other rule", field=clash[0])
    blocks = max_length // block
    if window < 2 or window > blocks:
        raise SettingsError(f"--window-blocks={window} is not allowed for rows of {blocks} blocks of {block}; use "
                            f"2..{blocks}" if blocks >= 2 else f"--window-blocks={window}: the row is one block of "
                            f"{block}, so there is nothing to pipeline; leave --window-blocks out",
                            field="window_blocks")
    optional = {k: given[k] for k in PIPELINE_ONLY if k in given}
    return PipelineSettings.d2f(max_length=max_length, block_length=block, window_blocks=window,
                                skip_threshold=given.get("threshold", 0.9),
                                **({"remasking": remasking} if remasking is not None else {}),
                                tokens=tokens, **optional, **proposal)


# -- sampling ---------------------------------------------------------------------------------------------------


def sample(cfg: Config, params, prompt, rng, *, settings, prompt_mask=None, cached: bool = True):
    """Samples continuations of equal-width `prompt` int[B, W] (left-padded with `prompt_mask`) with `settings`.

    Returns (tokens int32[B, W + G], nfe int32): the block sampler returns each row's prompt without padding
    followed by its generation; the masked sampler keeps the padding in place. `cached=False` runs the block
    sampler's uncached twin (same tokens; for checks and benchmarks).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if isinstance(settings, BlockSamplerSettings):
        fn = generate_blocks if cached else generate_blocks_uncached
        return fn(Denoiser(cfg.model), params, prompt, settings, rng, prompt_mask=prompt_mask)
    if isinstance(settings, PipelineSettings):
        fn = generate_pipelined if cached else generate_pipelined_uncached
        return fn(Denoiser(cfg.model), params, prompt, settings, rng, prompt_mask=prompt_mask)
    if prompt.shape[1] + settings.gen_length > cfg.model.max_seq_len:
        raise SettingsError(f"prompt ({prompt.shape[1]} tokens) + gen_length ({settings.gen_length}) = "
                            f"{prompt.shape[1] + settings.gen_length} exceeds the model's context "
                            f"model.max_seq_len={cfg.model.max_seq_len}", field="gen_length")
    return generate_masked(Denoiser(cfg.model), params, prompt, settings, rng, prompt_mask=prompt_mask)


@dataclasses.dataclass(frozen=True)
class Run:
    """A checkpoint opened for sampling: its config, parameters, token ids and text interface (`checkpoint_text`;
    None if it has none: token ids only)."""

    path: Path
    config: Config
    params: Any
    tokens: SpecialTokens
    text: Any

    def settings(self, prompt_len: int, request: SampleRequest = SampleRequest()):
        return sampler_settings(self.config, self.tokens, prompt_len, request)

    def _text(self, flag: str):
        if self.text is None:
            raise SettingsError(f"{self.path} carries no tokenizer (data.tokenizer={self.config.data.tokenizer!r}, "
                                f"and no tokenizer.json of a converted release); give token ids (--prompt-ids)",
                                field=flag)
        return self.text

    def encode(self, text: str) -> list[int]:
        """A plain text prompt: as the release's reference scripts tokenize it, or framed as the run's training
        rows (BOS first)."""
        return self._text("prompt").encode(text)

    def encode_chat(self, messages) -> list[int]:
        """A chat (`dlmjax.text.conversation(prompt, system)`, or a list of {"role", "content"} messages) through the
        checkpoint's chat template, ending with the assistant's turn."""
        return self._text("chat").encode_chat(messages)

    def decode(self, ids) -> str:
        """Ids as text, special tokens left out."""
        return self._text("prompt").decode(ids)

    def generated_text(self, ids, stop: Sequence[str] = ()) -> str:
        """A generation as text: cut before the first EOS / end-of-turn token, then before the first stop string."""
        text = self._text("prompt")
        stops = text.stop_ids() | {i for i in (self.tokens.eos_id, self.tokens.eot_id) if i is not None}
        return generated_text(text.decode, ids, frozenset(stops), stop)


def open_run(path: str | Path, *, mesh: jax.sharding.Mesh | None = None, dtype=None,
             attention: str | None = None) -> Run:
    """Loads a checkpoint (`dlmjax.load`) with its token ids and text interface: the notebook and CLI entry point.

    `mesh` and `dtype` go to `dlmjax.load`: each parameter is read straight into its sharding on `mesh` (by the
    run's `mesh.rules`) and cast to `dtype` (e.g. "bfloat16") while reading. The model then runs in `dtype`
    (bfloat16 or float32: `model.dtype` and `model.param_dtype` of `Run.config`, as a converted release of that
    dtype runs), so its matmuls take the weights as they are instead of converting them at each use; norms,
    rotary embeddings, attention softmax, logits and confidences stay float32. The samplers run sharded as they
    are (jit keeps the parameters' shardings). `attention` sets `model.attention_impl` ("xla", "pallas": the Pallas
    kernels on TPU / GPU, every cached sampling step included; "pallas_interpret" on CPU).
    """
    from dlmjax.checkpoint import load  # noqa: PLC0415 (orbax only when a checkpoint is read)

    cfg, params = load(path, mesh=mesh, dtype=dtype)
    if dtype is not None and jnp.dtype(dtype).name in ("bfloat16", "float32"):
        model = dataclasses.replace(cfg.model, dtype=jnp.dtype(dtype).name, param_dtype=jnp.dtype(dtype).name)
        cfg = dataclasses.replace(cfg, model=model)
    if attention is not None:  # `replace` re-runs the config's checks
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_impl=attention))
    text = checkpoint_text(cfg, path)
    return Run(path=Path(path), config=cfg, params=params, tokens=special_tokens(cfg, path, text), text=text)


def sample_generation(run: Run, rows: list[list[int]], request: SampleRequest = SampleRequest(), *, seed: int = 0,
                      on_block=None, trace: bool = False):
    """Samples after each prompt row (any lengths) with the run's sampler: the `dlmjax sample` library call.

    Prompt ids are checked on the host first (inside the vocabulary, no mask id). `on_block(block, rows)` sees
    the rows after each finished block; `trace` records the forward pass that committed each slot (both as in
    `dlmjax.generate`). Returns the `Generation` (`.rows()`: prompt + generation ids without padding, `.nfe`).
    """
    if not rows or any(not r for r in rows):
        raise SettingsError("every prompt needs at least one token", field="prompt_ids")
    check_token_rows(rows, "prompt_ids", vocab_size=run.config.model.vocab_size, tokens=run.tokens)
    settings = run.settings(max(len(r) for r in rows), request)
    return generate_rows(run.config, run.params, rows, settings, jax.random.PRNGKey(seed), on_block=on_block,
                         trace=trace)


def sample_rows(run: Run, rows: list[list[int]], request: SampleRequest = SampleRequest(), *, seed: int = 0,
                on_block=None):
    """`sample_generation`'s (rows of prompt + generation ids without padding, nfe)."""
    result = sample_generation(run, rows, request, seed=seed, on_block=on_block)
    return result.rows(), result.nfe


def block_edges(settings, prompt_lengths: Sequence[int]) -> list[list[int]]:
    """Per row, the slots of its prompt + generation where a block of `settings` starts or ends: after the prompt
    for the masked sampler, on the training grid from the row's first token for the block sampler."""
    if isinstance(settings, BlockSamplerSettings):
        edges = [k * settings.block_length for k in range(settings.num_blocks + 1)]
        return [edges for _ in prompt_lengths]
    return [[n + k * settings.block_length for k in range(settings.num_blocks + 1)] for n in prompt_lengths]


def check_sample_config(cfg: Config) -> None:
    """Raises `ConfigError` (naming the `sample.*` field) if the run's sampler settings cannot sample its task's
    held-out prompts; called when a task config loads, so a bad setting never waits for the end of training."""
    from dlmjax.data.tasks import get_task  # noqa: PLC0415 (numpy only)
    from dlmjax.errors import ConfigError  # noqa: PLC0415

    prompt_len = 1 + get_task(cfg.data.task, **cfg.data.task_kwargs()).prompt_len  # BOS + prompt
    try:
        sampler_settings(cfg, SpecialTokens(mask_id=cfg.diffusion.mask_id), prompt_len)
    except SettingsError as e:
        field = f"sample.{e.field}" if e.field else "sample"
        raise ConfigError(f"{field}: {e} (the task's prompts have {prompt_len} tokens)", field=field) from None
