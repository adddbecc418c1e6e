"""The masked-diffusion sampler: LLaDA, Fast-dLLM and Dream decoding as one jitted program (ALGORITHMS.md §4).

Canvas per row, `int32[B, N]`:

    [prompt (left-padded to width W) | G generated slots, mask_id at first | optional suffix (infilling)]
                                      [block 0 | block 1 | ... ]

The outer `lax.while_loop` walks the blocks of the generated region left to right (while some row is not
done); the inner one runs the block's denoising steps. A step is one forward pass followed by one update of the
block, built from small pure functions:

    forward (cache: none | prefix | dual) -> block logits -> [EOS -> -inf] -> propose + confidence
      -> eligible = masked slots of the block -> commits (schedule) -> commit

Where the block's logits come from (`settings.cache`, Fast-dLLM semantics, §4.5):
  none:   every step forwards the whole canvas.
  prefix: the block's first step forwards the whole canvas and keeps its K/V; later steps forward
          `canvas[s:]` (block + everything after it) against the K/V of the slots before the block.
  dual:   the first step as for prefix; later steps forward only the block, against the K/V of every other slot
          from that first step (the block's own K/V are fresh: the cached block entries are hidden).
The cached loop runs at least once after the first step (Fast-dLLM's NFE accounting at 24cc59e7).

How many slots a step commits (`settings.schedule`):
  llada:  the block's front-loaded transfer table (`threshold`/`factor`: Fast-dLLM's parallel rules; the block is
          denoised until it has no mask);
  dream:  Dream's `int(n * (1 - s/t))`, or its `confidence_threshold` algorithm with `threshold`;
  origin: Dream's independent unmasking with probability `1 - s/t`.

Rows are independent: prompts of different lengths are left-padded with a key mask that reaches attention, and
rotary positions count real tokens only (a padded row computes exactly what the unpadded row computes); each
row has its own transfer counts (Dream floors a batch average instead, which is the same number whenever rows
have equal mask counts, as in Dream's own use); with `stop_at_eos` a row that has generated EOS is frozen.
Nothing in the loops syncs with the host.

Random numbers: the carried key is split once per step (`step_keys`) into the next carried key, the key of the
proposal noise and the key of the uniform draws (random confidences, `origin`, `alg_temp` selection).

Where dlmjax departs from the references on purpose (each is a no-op in the references' normal use):
  - Only masked slots inside the current block are eligible (LLaDA would also take masks before the block).
  - A block stops denoising once it has no masked slot (LLaDA runs all `S` steps even when later ones commit
    nothing; Fast-dLLM stops, as here).
  - Classifier-free guidance works with or without a `prompt_mask`, and with the caches.
  - Ties in confidence go to the lower slot index (stable sort); `torch.topk` leaves them unspecified.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlmjax.models.transformer import padded_positions, shift_logits
from dlmjax.sampling.filters import filter_logits
from dlmjax.sampling.schedule import dream_transfer_fractions, transfer_counts
from dlmjax.sampling.settings import SamplerSettings

# denoiser(params, tokens int32[B, N], key_mask bool[B, N]) -> logits float[B, N, V]. It is a static
# argument of the jitted sampler, so it must be hashable (e.g. a frozen dataclass); its parameters
# are always passed in, never closed over, so they are not baked into the compiled program. The cached modes
# need `dlmjax.Denoiser` (a model with a KV cache).
Denoiser = Callable[[Any, jax.Array, jax.Array], jax.Array]


def step_keys(rng: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Splits the carried key into (next carried key, proposal-noise key, uniform-draw key)."""
    rng, step_rng = jax.random.split(rng)
    gumbel_key, confidence_key = jax.random.split(step_rng)
    return rng, gumbel_key, confidence_key


# ---------------------------------------------------------------------------------------------------------------
# Proposal and confidence


def propose(logits: jax.Array, temperature: float, key: jax.Array) -> jax.Array:
    """LLaDA's proposal per slot, int32[B, N], from logits float[B, N, V].

    `temperature == 0` is the argmax of the raw logits (no dtype change, ties to the lower id).
    Otherwise it is the Gumbel-max draw `argmax(logits + T * g)`, which equals LLaDA's
    `argmax(exp(logits) / (-log u)^T)`, i.e. a sample from `softmax(logits / T)`. Logits and noise
    are float64 when `jax_enable_x64` is on, as in LLaDA (low-precision Gumbel lowers entropy,
    arXiv 2409.02908); without x64 JAX has no float64 and both are float32.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64 is enabled
    gumbel = jax.random.gumbel(key, logits.shape, dtype)
    return jnp.argmax(logits.astype(dtype) + temperature * gumbel, axis=-1).astype(jnp.int32)


def confidence(logits: jax.Array, proposal: jax.Array, remasking: str, key: jax.Array,
               dtype: str | None = None) -> jax.Array:
    """Score that ranks slots for commitment, [B, N] (higher commits first).

    "low_confidence": `softmax(logits)[proposal]`; "margin": top-1 minus top-2 probability; "entropy":
    `sum p log(p + 1e-10)` (negative entropy); "random": a uniform draw per slot. The softmax runs in the
    logits' dtype as in LLaDA, or in `dtype` ("float64": Fast-dLLM; float32 unless x64 is enabled).
    Returned as float32, or float64 when asked for (so thresholds compare at the reference's precision).
    """
    out = jnp.float32 if dtype in (None, "float32") else jax.dtypes.canonicalize_dtype(jnp.float64)
    if remasking == "random":
        return jax.random.uniform(key, proposal.shape, jnp.float32).astype(out)
    probs = jax.nn.softmax(logits.astype(out) if dtype == "float64" else logits, axis=-1)
    return _score_from_probs(probs, proposal, remasking).astype(out)


def _score_from_probs(probs: jax.Array, proposal: jax.Array, remasking: str) -> jax.Array:
    if remasking == "low_confidence":
        return jnp.take_along_axis(probs, proposal[..., None], axis=-1)[..., 0]
    if remasking == "margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        return top2[..., 0] - top2[..., 1]
    if remasking == "entropy":
        return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
    raise ValueError(f"remasking={remasking!r} is not allowed; choose one of "
                     "['low_confidence', 'random', 'margin', 'entropy']")


def dream_propose(logits: jax.Array, settings: SamplerSettings, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dream's `sample_tokens`: (proposal int32[B, N], confidence float32[B, N]).

    Logits are divided by the temperature, nucleus-filtered (`top_p`), then `top_k`-filtered; `p = softmax`.
    `T > 0` draws the proposal from `p` and its confidence is its probability; `T = 0` takes `max p`. Margin and
    entropy confidences are computed from the same `p`.
    """
    s = settings
    scaled = logits / s.temperature if s.temperature > 0 else logits
    scaled = filter_logits(scaled, temperature=0.0, top_k=0, top_p=s.top_p)
    scaled = filter_logits(scaled, temperature=0.0, top_k=s.top_k, top_p=1.0)
    probs = jax.nn.softmax(scaled, axis=-1)
    if s.temperature > 0:
        proposal = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    else:
        proposal = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return proposal, _score_from_probs(probs, proposal, s.remasking).astype(jnp.float32)


def propose_and_score(logits: jax.Array, settings: SamplerSettings, gumbel_key: jax.Array,
                      confidence_key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Proposal int32[B, W] and confidence [B, W] from the block's logits float[B, W, V]."""
    s = settings
    vocab = logits.shape[-1]
    for flag, field in (("logits_eos_inf", "eos_id"), ("confidence_eos_eot_inf", "eos_id"),
                        ("confidence_eos_eot_inf", "eot_id")):
        if getattr(s, flag) and getattr(s, field) >= vocab:
            # An out-of-range `.at[].set` would be dropped silently and the token left in play.
            raise ValueError(f"SamplerSettings.{field}={getattr(s, field)} is not a logit index of a denoiser "
                             f"with vocabulary size {vocab}; use an id in [0, {vocab})")
    if s.logits_eos_inf:
        logits = logits.at[..., s.eos_id].set(-jnp.inf)
    if s.schedule != "llada":
        return dream_propose(logits, s, gumbel_key)
    logits = filter_logits(logits, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
    proposal = propose(logits, s.temperature, gumbel_key)
    if s.confidence_eos_eot_inf:
        # LLaDA: `logits_with_noise[..., EOS] = logits[..., EoT] = -inf`; at T = 0 both names are one tensor.
        logits = logits.at[..., s.eot_id].set(-jnp.inf)
        if s.temperature == 0:
            logits = logits.at[..., s.eos_id].set(-jnp.inf)
    return proposal, confidence(logits, proposal, s.remasking, confidence_key, s.confidence_dtype)


# ---------------------------------------------------------------------------------------------------------------
# Which slots a step commits


def ranks(scores: jax.Array) -> jax.Array:
    """Rank of each slot in a stable descending sort of its row, int32[B, W] (equal scores: lower index first)."""
    order = jnp.argsort(-scores, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def select_commits(scores: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the `k_j` highest-scoring slots among those with a finite score.

    `lax.top_k` needs a static `k`, so each slot gets its rank in a stable descending sort
    (equal scores: lower index first) and the slots with `rank < k_j` are chosen. Slots scored -inf
    are never chosen, even if `k_j` exceeds their row's eligible count.

    Args:
      scores: float[B, N], -inf where a slot may not be committed.
      k: int[B], commits wanted per row.

    Returns:
      bool[B, N], True where a proposal is committed.
    """
    return (ranks(scores) < k[:, None]) & (scores > -jnp.inf)


def select_threshold(scores: jax.Array, threshold: float) -> jax.Array:
    """Fast-dLLM's threshold rule: the best eligible slot, plus every eligible slot with score >= threshold."""
    return (scores > -jnp.inf) & ((ranks(scores) == 0) | (scores >= threshold))


def select_factor(scores: jax.Array, factor: float) -> jax.Array:
    """Fast-dLLM's factor rule (`get_transfer_index_dynamic`).

    With the eligible scores sorted `c_1 >= c_2 >= ... >= c_M` and thresholds `theta_1 = -1`,
    `theta_n = 1 - factor / (n + 1)`, commit the top `n*`, the number of leading ranks with `c_n >= theta_n`
    (the scan stops at the first miss); as in the reference, a first miss at the last rank `M` commits all `M`.
    """
    eligible = scores > -jnp.inf
    count = eligible.sum(axis=-1)
    rank = ranks(scores)
    ordered = jnp.take_along_axis(scores, jnp.argsort(rank, axis=-1), axis=-1)
    n = jnp.arange(1, scores.shape[-1] + 1, dtype=scores.dtype)
    theta = jnp.where(n == 1, -1.0, 1.0 - factor / (n + 1)).astype(scores.dtype)
    hit = (ordered >= theta) & (n <= count[:, None])
    leading = jnp.cumprod(hit.astype(jnp.int32), axis=-1).sum(axis=-1)
    take = jnp.where(leading == count - 1, count, leading)
    return eligible & (rank < take[:, None])


def select_sampled(scores: jax.Array, k: jax.Array, alg_temp: float, key: jax.Array) -> jax.Array:
    """Dream's `alg_temp > 0`: `k_j` slots drawn without replacement from `softmax(scores / alg_temp)`
    (the Gumbel-top-k trick: the top `k` of `scores / alg_temp + g`)."""
    eligible = scores > -jnp.inf
    noisy = scores.astype(jnp.float32) / alg_temp + jax.random.gumbel(key, scores.shape, jnp.float32)
    return select_commits(jnp.where(eligible, noisy, -jnp.inf), k)


def restrict_to_block(
    scores: jax.Array, canvas: jax.Array, *, mask_id: int, block_start: jax.Array, block_length: int
) -> jax.Array:
    """Sets scores to -inf except at masked slots in `[block_start, block_start + block_length)`.

    Args:
      scores: float[B, N] confidences.
      canvas: int32[B, N] current tokens.
      block_start: int32 scalar (traced), first canvas slot of the current block.
    """
    position = jnp.arange(canvas.shape[1], dtype=jnp.int32)
    in_block = (position >= block_start) & (position < block_start + block_length)
    eligible = (canvas == mask_id) & in_block[None, :]
    return jnp.where(eligible, scores, -jnp.inf)


def commit(canvas: jax.Array, proposal: jax.Array, commits: jax.Array) -> jax.Array:
    """Writes `proposal` into the canvas where `commits` is True; int32[B, N]."""
    return jnp.where(commits, proposal, canvas)


class Schedule:
    """Per-block commit rule: `init(n_masked) -> state`, `commits(...)`, `more(...)` (pure, static settings).

    `state` is a tuple of int32[B] arrays; `step` counts the block's forward passes (0 = its first).
    """

    def __init__(self, settings: SamplerSettings):
        self.s = settings
        self.steps = settings.steps_per_block
        if settings.schedule != "llada":
            self.fractions = jnp.asarray(dream_transfer_fractions(self.steps, settings.eps))

    @property
    def max_steps(self) -> int:
        """A static bound on the block's forward passes (each rule commits >= 1 slot per step once it must)."""
        s = self.s
        bl = s.block_length
        if s.schedule == "llada":
            bound = bl if s.parallel else self.steps
            return bound + (1 if s.cache != "none" else 0)  # the cached loop's mandatory pass
        if s.schedule == "dream" and s.threshold is not None:
            return self.steps + bl
        return self.steps

    def init(self, n_masked: jax.Array):
        s = self.s
        if s.schedule == "llada" and not s.parallel:
            return (transfer_counts(n_masked, self.steps),)
        if s.schedule == "dream" and s.threshold is not None:
            # Dream requires n % S == 0; a remainder (only with pre-filled slots) is carried into the first step.
            return (n_masked // self.steps, n_masked % self.steps, jnp.full_like(n_masked, self.steps))
        return ()

    def commits(self, scores, state, step, key):
        """bool[B, W] commits from the eligible scores (-inf elsewhere), and the new state."""
        s = self.s
        if s.schedule == "llada":
            if s.threshold is not None:
                return select_threshold(scores, s.threshold), state
            if s.factor is not None:
                return select_factor(scores, s.factor), state
            (table,) = state
            k = jnp.where(step < self.steps, table[:, jnp.minimum(step, self.steps - 1)], 0)
            return select_commits(scores, k), state
        eligible = scores > -jnp.inf
        n_masked = eligible.sum(axis=-1)
        fraction = self.fractions[jnp.minimum(step, self.steps - 1)]
        if s.schedule == "origin":
            return eligible & (jax.random.uniform(key, scores.shape, jnp.float32) < fraction), state
        if s.threshold is None:
            k = (n_masked.astype(jnp.float32) * fraction).astype(jnp.int32)
            if s.alg_temp > 0:
                return select_sampled(scores, k, s.alg_temp, key), state
            return select_commits(scores, k), state
        return self._dream_threshold(scores, state, step)

    def _dream_threshold(self, scores, state, step):
        """Dream's `confidence_threshold` (Fast-dLLM addition), per row: budget `number + left`; the best slot
        always commits, the others in the budget only at confidence >= threshold; rejected ones are carried to
        the next step; a rejection at the last step drops the fixed budget and extends the loop by one step."""
        number, left, limit = state
        active = step < limit
        current = number + left
        rank = ranks(scores)
        in_budget = rank < current[:, None]
        accept_rest = in_budget & (rank >= 1) & (scores >= self.s.threshold)  # -inf never passes
        commits = ((in_budget & (rank == 0)) | accept_rest) & (scores > -jnp.inf) & active[:, None]
        rejected = jnp.maximum(current - 1, 0) - accept_rest.sum(axis=-1)
        extend = (step >= limit - 1) & (rejected > 0)
        new = (jnp.where(extend, 0, number), rejected, jnp.where(extend, limit + 1, limit))
        state = tuple(jnp.where(active, n, o) for n, o in zip(new, state))
        return commits, state

    def more(self, state, step, block_masked: jax.Array) -> jax.Array:
        """Whether the block takes another step; `block_masked` is bool[B], rows with a mask left in the block."""
        s = self.s
        if s.schedule == "llada":
            want = block_masked.any()
            if not s.parallel:
                want = want & (step < self.steps)
            if s.cache != "none":
                want = want | (step == 1)  # Fast-dLLM's cached loop runs at least once after the first step
            return want & (step < self.max_steps)
        if s.schedule == "dream" and s.threshold is not None:
            (_, _, limit) = state
            return (step < limit).any() & (step < self.max_steps)
        return step < self.steps


# ---------------------------------------------------------------------------------------------------------------
# Forward passes


class _Forward:
    """The model calls of one request: classifier-free guidance doubling, positions, caches, Dream's shift."""

    def __init__(self, denoiser, params, canvas0, key_mask, settings: SamplerSettings):
        self.denoiser, self.params, self.s = denoiser, params, settings
        self.key_mask = key_mask
        self.positions = padded_positions(key_mask)
        # LLaDA's unconditional copy masks everything that was not [MASK] at the start (prompt and suffix).
        self.given = canvas0 != settings.mask_id
        self.cfg = settings.cfg_scale > 0
        self.shifted = bool(getattr(denoiser, "shifted", False))

    def _double(self, x, start=0):
        """[B, n] -> [2B, n] with the unconditional copy, when guidance is on."""
        if not self.cfg:
            return x
        given = jax.lax.dynamic_slice_in_dim(self.given, start, x.shape[1], axis=1)
        return jnp.concatenate([x, jnp.where(given, jnp.int32(self.s.mask_id), x)], axis=0)

    def _twice(self, x):
        return jnp.concatenate([x, x], axis=0) if self.cfg else x

    def _mix(self, logits):
        if not self.cfg:
            return logits
        batch = logits.shape[0] // 2
        cond, uncond = logits[:batch], logits[batch:]
        return uncond + (self.s.cfg_scale + 1.0) * (cond - uncond)

    def full(self, canvas):
        """Uncached forward of the whole canvas -> position-aligned logits [B, N, V]."""
        logits = self.denoiser(self.params, self._double(canvas), self._twice(self.key_mask))
        _check_logits(logits, (2 if self.cfg else 1) * canvas.shape[0], canvas.shape[1])
        return self._mix(logits)

    def full_with_cache(self, canvas):
        """The block's first pass: whole canvas, K/V of every slot kept -> (aligned logits [B, N, V], cache)."""
        batch, length = canvas.shape
        cache = self.denoiser.init_cache((2 if self.cfg else 1) * batch, length)
        raw, cache = self.denoiser.forward_cached(
            self.params, self._double(canvas), positions=self._twice(self.positions),
            key_mask=self._twice(self.key_mask), cache=cache, update_cache=True)
        logits = self._mix(raw)
        if self.shifted:
            logits = shift_logits(logits)
        return logits, cache

    def chunk(self, canvas, cache, start, length: int, hidden_from, hidden_to):
        """Forward `canvas[:, start:start + length]` against the cache with slots `[hidden_from, hidden_to)` hidden.

        Returns raw logits [B, length, V] (for Dream, row j predicts slot start + j + 1).
        """
        tokens = jax.lax.dynamic_slice_in_dim(canvas, start, length, axis=1)
        slot = jnp.arange(cache["key_mask"].shape[1])
        visible = cache["key_mask"] & ~((slot >= hidden_from) & (slot < hidden_to))[None, :]
        sliced = lambda x: self._twice(jax.lax.dynamic_slice_in_dim(x, start, length, axis=1))  # noqa: E731
        raw, _ = self.denoiser.forward_cached(
            self.params, self._double(tokens, start), positions=sliced(self.positions),
            key_mask=sliced(self.key_mask), cache={**cache, "key_mask": visible}, update_cache=False)
        return self._mix(raw)


# ---------------------------------------------------------------------------------------------------------------
# The sampler


def check_request(prompt, settings, settings_type) -> jax.Array:
    """The static checks every sampler makes before tracing: the settings' type and an int[B, Lp] prompt."""
    if not isinstance(settings, settings_type):
        raise TypeError(f"settings must be a {settings_type.__name__}, got {type(settings).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be int[batch, prompt_length], got {prompt.dtype}{list(prompt.shape)}")
    return prompt


def _mask_like(name, mask, shape):
    if mask is None:
        return jnp.ones(shape, bool)
    mask = jnp.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    return mask.astype(bool)


@functools.partial(jax.jit, static_argnames=("denoiser", "settings", "return_history"))
def generate(
    denoiser: Denoiser,
    params: Any,
    prompt: jax.Array,
    settings: SamplerSettings,
    rng: jax.Array,
    *,
    prompt_mask: jax.Array | None = None,
    suffix: jax.Array | None = None,
    suffix_mask: jax.Array | None = None,
    return_history: bool = False,
):
    """Generates `settings.gen_length` tokens after each prompt row (and before its `suffix`, if given).

    Compiled once per (denoiser, settings, shapes, return_history, which masks are given); params, token
    values, mask values and rng are traced, so new values never recompile.

    Args:
      denoiser: static, hashable `denoiser(params, tokens, key_mask) -> logits` (see `Denoiser`); the caches
        need `dlmjax.Denoiser`.
      params: the denoiser's parameter pytree.
      prompt: int[B, W]; rows shorter than `W` are left-padded (pad id != mask_id) with `prompt_mask`.
      settings: static `SamplerSettings`.
      rng: PRNG key; consumed by `temperature > 0`, `remasking="random"`, `origin` and `alg_temp`.
      prompt_mask: bool[B, W], True on real prompt tokens; default all True.
      suffix: int[B, Ls], clean tokens after the generated region (infilling: the generation fills the middle).
        Rows shorter than `Ls` are right-padded with `suffix_mask` False.
      return_history: static debugging switch; also return the canvas after every step.

    Returns:
      tokens: int32[B, W + G (+ Ls)], the prompt, the generated tokens (and the suffix).
      nfe: int32 scalar, forward passes run (a guidance pass over the doubled batch counts once).
      history (only if `return_history`): int32[max_nfe, B, N], the canvas after each forward (zeros after the last).
    """
    prompt = check_request(prompt, settings, SamplerSettings)
    s = settings
    batch, width = prompt.shape
    gen = s.gen_length
    prompt_mask = _mask_like("prompt_mask", prompt_mask, prompt.shape)
    pieces = [prompt.astype(jnp.int32), jnp.full((batch, gen), s.mask_id, jnp.int32)]
    masks = [prompt_mask, jnp.ones((batch, gen), bool)]
    if suffix is not None:
        suffix = jnp.asarray(suffix)
        if suffix.ndim != 2 or suffix.shape[0] != batch or not jnp.issubdtype(suffix.dtype, jnp.integer):
            raise ValueError(f"suffix must be int[batch={batch}, suffix_length], got {suffix.dtype}"
                             f"{list(suffix.shape)}")
        pieces.append(suffix.astype(jnp.int32))
        masks.append(_mask_like("suffix_mask", suffix_mask, suffix.shape))
    canvas = jnp.concatenate(pieces, axis=1)
    key_mask = jnp.concatenate(masks, axis=1)
    length = canvas.shape[1]
    forward = _Forward(denoiser, params, canvas, key_mask, s)
    if s.cache != "none":
        for method in ("init_cache", "forward_cached"):
            if not hasattr(denoiser, method):
                raise ValueError(f"SamplerSettings.cache={s.cache!r} needs a model denoiser with a KV cache "
                                 f"(dlmjax.Denoiser); {type(denoiser).__name__} has no {method}()")
        if forward.shifted and width < 1:
            raise ValueError("a Dream model with a cache needs a prompt of at least one token: the first "
                             "generated slot is predicted from the slot before it")
    schedule = Schedule(s)
    bl = s.block_length
    lead = 1 if forward.shifted else 0
    max_nfe = s.num_blocks * schedule.max_steps
    history = jnp.zeros((max_nfe,) + canvas.shape, jnp.int32) if return_history else None

    def update(canvas, block_logits, block_start, step, state, rng):
        """One update of the block from its logits [B, bl, V]; returns (canvas, state, rng)."""
        rng, gumbel_key, confidence_key = step_keys(rng)
        block = jax.lax.dynamic_slice_in_dim(canvas, block_start, bl, axis=1)
        proposal, scores = propose_and_score(block_logits, s, gumbel_key, confidence_key)
        scores = jnp.where(block == s.mask_id, scores, -jnp.inf)
        commits, state = schedule.commits(scores, state, step, confidence_key)
        block = commit(block, proposal, commits)
        return jax.lax.dynamic_update_slice_in_dim(canvas, block, block_start, axis=1), state, rng

    def record(history, nfe, canvas):
        return None if history is None else history.at[nfe - 1].set(canvas)

    def block_masked(canvas, block_start):
        return (jax.lax.dynamic_slice_in_dim(canvas, block_start, bl, axis=1) == s.mask_id).any(axis=1)

    def block_logits_of(logits, block_start):
        return jax.lax.dynamic_slice_in_dim(logits, block_start, bl, axis=1)

    def run_uncached(carry, block_start):
        canvas, rng, nfe, history = carry
        state = schedule.init((jax.lax.dynamic_slice_in_dim(canvas, block_start, bl, axis=1)
                               == s.mask_id).sum(axis=1).astype(jnp.int32))

        def cond(c):
            step, canvas, _, _, state, _ = c
            return schedule.more(state, step, block_masked(canvas, block_start))

        def body(c):
            step, canvas, rng, nfe, state, history = c
            logits = block_logits_of(forward.full(canvas), block_start)
            canvas, state, rng = update(canvas, logits, block_start, step, state, rng)
            return step + 1, canvas, rng, nfe + 1, state, record(history, nfe + 1, canvas)

        _, canvas, rng, nfe, _, history = jax.lax.while_loop(
            cond, body, (jnp.int32(0), canvas, rng, nfe, state, history))
        return canvas, rng, nfe, history

    def run_cached(carry, block_start, chunk_length: int):
        """Fast-dLLM: first pass over the whole canvas with its K/V kept, then cached chunk passes."""
        canvas, rng, nfe, history = carry
        state = schedule.init((jax.lax.dynamic_slice_in_dim(canvas, block_start, bl, axis=1)
                               == s.mask_id).sum(axis=1).astype(jnp.int32))
        logits, cache = forward.full_with_cache(canvas)
        canvas, state, rng = update(canvas, block_logits_of(logits, block_start), block_start, 0, state, rng)
        nfe = nfe + 1
        history = record(history, nfe, canvas)
        chunk_start = block_start - lead  # Dream reads slot i from the row before it
        # prefix: hide every cached slot from the chunk on (the chunk brings fresh K/V for them);
        # dual: hide only the chunk's slots (the block, plus the lead slot).
        hidden_to = length if s.cache == "prefix" else block_start + bl

        def cond(c):
            step, canvas, _, _, state, _ = c
            return schedule.more(state, step, block_masked(canvas, block_start))

        def body(c):
            step, canvas, rng, nfe, state, history = c
            raw = forward.chunk(canvas, cache, chunk_start, chunk_length, chunk_start, hidden_to)
            canvas, state, rng = update(canvas, raw[:, :bl], block_start, step, state, rng)
            return step + 1, canvas, rng, nfe + 1, state, record(history, nfe + 1, canvas)

        _, canvas, rng, nfe, _, history = jax.lax.while_loop(
            cond, body, (jnp.int32(1), canvas, rng, nfe, state, history))
        return canvas, rng, nfe, history

    # Static chunk lengths: a prefix-cache step forwards everything from its block on, so each block has its own
    # length (one branch of a `lax.switch` per block); the dual cache forwards the block (+ Dream's lead slot).
    starts = [width + b * bl for b in range(s.num_blocks)]
    if s.cache == "none":
        branches = [run_uncached]
        branch_of_block = np.zeros(s.num_blocks, np.int32)
    elif s.cache == "dual":
        branches = [functools.partial(run_cached, chunk_length=bl + lead)]
        branch_of_block = np.zeros(s.num_blocks, np.int32)
    else:
        lengths = sorted({length - start + lead for start in starts}, reverse=True)
        branches = [functools.partial(run_cached, chunk_length=n) for n in lengths]
        branch_of_block = np.asarray([lengths.index(length - start + lead) for start in starts], np.int32)
    branch_of_block = jnp.asarray(branch_of_block)

    slot = jnp.arange(length, dtype=jnp.int32)
    generated = (slot >= width) & (slot < width + gen)

    def outer_cond(c):
        block, _, _, _, done, _ = c
        return (block < s.num_blocks) & ~done.all()

    def outer_body(c):
        block, canvas, rng, nfe, done, history = c
        block_start = width + block * bl
        carry = (canvas, rng, nfe, history)
        if len(branches) == 1:
            canvas, rng, nfe, history = branches[0](carry, block_start)
        else:
            canvas, rng, nfe, history = jax.lax.switch(
                branch_of_block[block], [functools.partial(b, block_start=block_start) for b in branches], carry)
        if s.stop_at_eos:
            block_end = block_start + bl
            has_eos = ((canvas == s.eos_id) & generated[None, :] & (slot < block_end)[None, :]).any(axis=1)
            done = done | has_eos
            # A done row is frozen: its later slots hold pad_id, so no later block has anything to denoise.
            fill = done[:, None] & (generated & (slot >= block_end))[None, :]
            canvas = jnp.where(fill, jnp.int32(s.pad_id), canvas)
        return block + 1, canvas, rng, nfe, done, history

    init = (jnp.int32(0), canvas, rng, jnp.int32(0), jnp.zeros((batch,), bool), history)
    _, canvas, _, nfe, _, history = jax.lax.while_loop(outer_cond, outer_body, init)
    if return_history:
        return canvas, nfe, history
    return canvas, nfe


def _check_logits(logits: jax.Array, batch: int, length: int) -> None:
    if logits.ndim != 3 or logits.shape[:2] != (batch, length):
        raise ValueError(
            f"the denoiser must return logits [batch={batch}, length={length}, vocab], "
            f"got shape {list(logits.shape)}")
