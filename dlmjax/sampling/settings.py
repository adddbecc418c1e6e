"""Static settings of the two samplers, composed of strategy objects.

`SamplerSettings` (the masked sampler, `generate_masked`) = a common core (`gen_length`, `steps`, `block_length`,
`tokens`, `stop_at_eos`) + a proposal rule (`proposals`) + a commit rule (`rules`) + a cache mode (`cache`) +
guidance (`guidance`). `BlockSamplerSettings` (the block sampler, `generate_blocks`) = its core (`max_length`,
`block_length`, `steps_per_block`, `tokens`, `cache_length`) + a proposal rule + a commit rule.

Both are static arguments of the jitted samplers: frozen, hashable, validated once when built, so a bad
combination never reaches tracing. The constructors `SamplerSettings.llada(...)`, `SamplerSettings.dream(...)` and
`BlockSamplerSettings.bd3(...)` / `.v2(...)` take the references' own flat keywords (LLaDA / Fast-dLLM `generate`,
Dream `diffusion_generate`, BD3-LM's sampler, Fast-dLLM v2's sub-block decoding) and build the strategies.
"""
from __future__ import annotations

import dataclasses

from dlmjax.errors import SettingsError
from dlmjax.sampling import validation as check
from dlmjax.sampling.cache import CacheMode, DualCache, NoCache, PrefixCache
from dlmjax.sampling.choices import BLOCK_CONFIDENCES, CacheKind, Confidence, DreamAlg, parse_choice
from dlmjax.sampling.guidance import Guidance
from dlmjax.sampling.proposals import DreamProposal, LladaProposal, Proposal
from dlmjax.sampling.rules import (CommitRule, DreamOrigin, DreamTransfer, DreamThreshold, EntropyBound, Factor,
                                   SubBlocks, Threshold, TransferTable)
from dlmjax.sampling.tokens import SpecialTokens

CACHE_MODES: dict[CacheKind, CacheMode] = {CacheKind.NONE: NoCache(), CacheKind.PREFIX: PrefixCache(),
                                           CacheKind.DUAL: DualCache()}
# The rules Fast-dLLM's caches were defined with (its loop: a first pass, then cached passes until filled).
CACHED_RULES = (TransferTable, Threshold, Factor)
_RULE_METHODS = ("init", "commits", "more", "max_steps")


def special_tokens(tokens: SpecialTokens | None, **ids) -> SpecialTokens:
    """`tokens`, or a `SpecialTokens` of the ids given (a constructor takes one or the other)."""
    given = {k: v for k, v in ids.items() if v is not None}
    if tokens is None:
        return SpecialTokens(**given)
    if given:
        check.fail("SpecialTokens", next(iter(given)), next(iter(given.values())),
                   "give the ids either in tokens=SpecialTokens(...) or as keywords, not both")
    return tokens


def _check_parts(owner: str, settings) -> None:
    if not isinstance(settings.tokens, SpecialTokens):
        check.fail(owner, "tokens", settings.tokens, "use a dlmjax.sampling.SpecialTokens")
    if not isinstance(settings.proposal, (LladaProposal, DreamProposal)):
        check.fail(owner, "proposal", settings.proposal, "use a LladaProposal or a DreamProposal")
    if not all(callable(getattr(settings.rule, m, None)) for m in _RULE_METHODS):
        check.fail(owner, "rule", settings.rule, f"use a commit rule (dlmjax.sampling.rules: {list(_RULE_METHODS)})")
    inner = settings.rule.inner if isinstance(settings.rule, SubBlocks) else settings.rule
    if isinstance(inner, EntropyBound) and settings.proposal.confidence != Confidence.ENTROPY:
        # The rule sums the scores as entropies; probabilities or margins would be read as nonsense bounds.
        kind = str(settings.proposal.confidence)
        check.fail(owner, "rule", settings.rule, "EntropyBound needs scores that are negative entropies: a "
                   f"proposal with confidence='entropy' (remasking='entropy'), not {kind!r}")
    settings.proposal.check_tokens(settings.tokens)


def _parallel_rule(owner: str, threshold, factor, entropy_bound) -> CommitRule | None:
    """The parallel rule the flat keywords choose (None: none set); at most one of them."""
    given = {k: v for k, v in (("threshold", threshold), ("factor", factor), ("entropy_bound", entropy_bound))
             if v is not None}
    if len(given) > 1:
        (first, a), (field, value) = list(given.items())[:2]
        check.fail(owner, field, value, f"{first}={a} and {field} are two rules for the same choice; set one of them")
    if threshold is not None:
        return Threshold(threshold)
    if factor is not None:
        return Factor(factor)
    if entropy_bound is not None:
        return EntropyBound(entropy_bound)
    return None


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """How the masked sampler fills a generation region of `gen_length` slots.

    Attributes:
      gen_length: Number of generated slots `G` after the prompt.
      steps: Denoising steps summed over all blocks (LLaDA's convention); each block gets `steps // num_blocks`,
        its step budget `S` (what the fixed-count rules spread their commits over).
      block_length: Slots per block `L'`; None is one block of `gen_length` slots (no semi-AR). Resolved to an int
        when built, so equal settings hash equally and share one compiled sampler.
      tokens: The model's special token ids (mask; EOS/EoT/pad for the flags that use them).
      proposal: What a step proposes at each slot and the confidence that ranks the slots (`LladaProposal`,
        `DreamProposal`).
      rule: Which slots a step commits (`TransferTable`, `Threshold`, `Factor`, `EntropyBound` (with the entropy
        confidence), `DreamTransfer`, `DreamThreshold`, `DreamOrigin`, or any object with the `CommitRule` methods).
      cache: Where a step's block logits come from (`NoCache`, `PrefixCache`, `DualCache`).
      guidance: Classifier-free guidance (`Guidance(cfg_scale)`; 0 is off).
      stop_at_eos: A row that has generated `tokens.eos_id` is done once its block is finished: its later slots are
        filled with `tokens.pad_id` and never denoised, and sampling stops when every row is done.
    """

    gen_length: int
    steps: int
    block_length: int | None = None
    tokens: SpecialTokens
    proposal: Proposal = LladaProposal()
    rule: CommitRule = TransferTable()
    cache: CacheMode = NoCache()
    guidance: Guidance = Guidance()
    stop_at_eos: bool = False

    def __post_init__(self):
        if self.block_length is None and check.is_int(self.gen_length):
            object.__setattr__(self, "block_length", self.gen_length)
        self.validate()

    @property
    def num_blocks(self) -> int:
        """Blocks denoised left to right: `gen_length // block_length`."""
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        """The step budget `S` of each block: `steps // num_blocks`."""
        return self.steps // self.num_blocks

    def validate(self) -> None:
        """Raises SettingsError naming the field, its value and what is allowed."""
        name = type(self).__name__
        for field in ("gen_length", "steps", "block_length"):
            check.positive_int(name, field, getattr(self, field))
        if self.gen_length % self.block_length:
            divisors = [d for d in range(1, self.gen_length + 1) if self.gen_length % d == 0]
            raise SettingsError(f"{name}.block_length={self.block_length} does not divide gen_length="
                                f"{self.gen_length}; choose a divisor of gen_length, one of {divisors}",
                                field="block_length")
        if self.steps % self.num_blocks:
            # Also catches steps < num_blocks: no block may get zero steps.
            n = self.num_blocks
            raise SettingsError(f"{name}.steps={self.steps} is not a multiple of num_blocks={n} (= gen_length // "
                                f"block_length); choose one of {n}, {2 * n}, {3 * n}, ...", field="steps")
        _check_parts(name, self)
        if not isinstance(self.cache, (NoCache, PrefixCache, DualCache)):
            check.fail(name, "cache", self.cache, "use NoCache(), PrefixCache() or DualCache()")
        if not isinstance(self.guidance, Guidance):
            check.fail(name, "guidance", self.guidance, "use a Guidance(cfg_scale)")
        check.boolean(name, "stop_at_eos", self.stop_at_eos)
        if isinstance(self.rule, SubBlocks):
            check.fail(name, "rule", self.rule, "SubBlocks (Fast-dLLM v2's sub-block decoding) runs in the block "
                       "sampler: use BlockSamplerSettings.v2(...)")
        if self.stop_at_eos and self.tokens.eos_id is None:
            check.fail("SpecialTokens", "eos_id", None, f"{name}.stop_at_eos=True needs the model's eos_id")
        if self.cache.keeps_kv and not (isinstance(self.rule, CACHED_RULES)
                                        and isinstance(self.proposal, LladaProposal)):
            # Fast-dLLM defined its caches for LLaDA's loop; other combinations are refused rather than guessed.
            check.fail(name, "cache", self.cache, "Fast-dLLM's caches run with LLaDA's proposal and the "
                       "TransferTable, Threshold or Factor rule; use NoCache() with Dream's decoding")

    @classmethod
    def llada(cls, *, gen_length: int, steps: int, block_length: int | None = None,
              remasking: str | None = None, threshold: float | None = None, factor: float | None = None,
              entropy_bound: float | None = None, cache: str = CacheKind.NONE, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, cfg_scale: float = 0.0, confidence_dtype: str = "float32",
              logits_eos_inf: bool = False, confidence_eos_eot_inf: bool = False, stop_at_eos: bool = False,
              tokens: SpecialTokens | None = None, mask_id: int | None = None, eos_id: int | None = None,
              eot_id: int | None = None, pad_id: int | None = None) -> "SamplerSettings":
        """Settings in LLaDA / Fast-dLLM `generate` terms.

        `remasking`: low_confidence (the default), random, margin or entropy. `threshold` (in (0, 1]) or `factor`
        (> 0) choose Fast-dLLM's parallel rules instead of LLaDA's transfer table, `entropy_bound` (nats, >= 0)
        the entropy-bounded rule (`EntropyBound`; remasking defaults to entropy then, and must be it); one of the
        three at most. `cache`: none, prefix or dual. Token ids come from `tokens` or the id keywords.
        """
        rule = _parallel_rule("SamplerSettings", threshold, factor, entropy_bound) or TransferTable()
        if remasking is None:
            remasking = Confidence.ENTROPY if entropy_bound is not None else Confidence.LOW_CONFIDENCE
        # The choices are checked under the names the caller used (`remasking` is the proposal's `confidence`).
        cache_kind = parse_choice(CacheKind, cache, owner="SamplerSettings", field="cache")
        remasking = parse_choice(Confidence, remasking, owner="SamplerSettings", field="remasking")
        proposal = LladaProposal(temperature=temperature, top_k=top_k, top_p=top_p, confidence=remasking,
                                 confidence_dtype=confidence_dtype, logits_eos_inf=logits_eos_inf,
                                 confidence_eos_eot_inf=confidence_eos_eot_inf)
        return cls(gen_length=gen_length, steps=steps, block_length=block_length, proposal=proposal, rule=rule,
                   cache=CACHE_MODES[cache_kind], guidance=Guidance(cfg_scale), stop_at_eos=stop_at_eos,
                   tokens=special_tokens(tokens, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, pad_id=pad_id))

    @classmethod
    def dream(cls, *, max_new_tokens: int, steps: int, alg: str = DreamAlg.ORIGIN, alg_temp: float | None = None,
              threshold: float | None = None, eps: float = 1e-3, temperature: float = 1.0, top_k: int = 50,
              top_p: float = 1.0, block_length: int | None = None, cfg_scale: float = 0.0,
              logits_eos_inf: bool = False, stop_at_eos: bool = False, tokens: SpecialTokens | None = None,
              mask_id: int | None = None, eos_id: int | None = None, eot_id: int | None = None,
              pad_id: int | None = None) -> "SamplerSettings":
        """Settings in Dream's `diffusion_generate` terms: `alg` in origin, maskgit_plus, topk_margin, entropy,
        confidence_threshold (Fast-dLLM's addition; default threshold 0.9 as there). `alg_temp` (maskgit_plus,
        topk_margin, entropy) draws the committed slots from `softmax(confidence / alg_temp)`.

        The proposal defaults are the reference's as released: `diffusion_generate` called without a generation
        config builds one from the model config, which carries the old generation defaults `temperature=1.0`,
        `top_k=50`, `top_p=1.0`; so even a greedy call (`temperature=0`) ranks slots by confidences computed over the
        50 most likely tokens only. A release's `generation_config.json` may set others (`dlmjax convert` reads
        it); `top_k=0` turns the filter off."""
        owner = "SamplerSettings.dream"
        alg = parse_choice(DreamAlg, alg, owner=owner, field="alg")
        confidences = {DreamAlg.TOPK_MARGIN: Confidence.MARGIN, DreamAlg.ENTROPY: Confidence.ENTROPY}
        if threshold is not None and alg != DreamAlg.CONFIDENCE_THRESHOLD:
            check.fail(owner, "threshold", threshold, "it needs alg='confidence_threshold'")
        scheduled = alg in (DreamAlg.MASKGIT_PLUS, DreamAlg.TOPK_MARGIN, DreamAlg.ENTROPY)
        if alg_temp and not scheduled:
            check.fail(owner, "alg_temp", alg_temp, f"alg={str(alg)!r} takes none; it draws slots for maskgit_plus, "
                       "topk_margin and entropy")
        if alg == DreamAlg.ORIGIN:
            rule = DreamOrigin(eps=eps)
        elif alg == DreamAlg.CONFIDENCE_THRESHOLD:
            rule = DreamThreshold(0.9 if threshold is None else threshold)
        else:
            rule = DreamTransfer(eps=eps, alg_temp=alg_temp or 0.0)
        proposal = DreamProposal(temperature=temperature, top_k=top_k, top_p=top_p,
                                 confidence=confidences.get(alg, Confidence.LOW_CONFIDENCE),
                                 logits_eos_inf=logits_eos_inf)
        return cls(gen_length=max_new_tokens, steps=steps, block_length=block_length, proposal=proposal, rule=rule,
                   guidance=Guidance(cfg_scale), stop_at_eos=stop_at_eos,
                   tokens=special_tokens(tokens, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id, pad_id=pad_id))


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlockSamplerSettings:
    """How the block-diffusion sampler (`generate_blocks`) fills rows up to `max_length`.

    A row is cut into blocks of `block_length` slots counted from its first token, the grid BD3 training uses, so a
    prompt that ends inside a block shares that block with the first generated slots. Blocks are finished left to
    right; each is denoised in at most the rule's bound of steps (one forward pass each), then committed to the KV
    cache. `block_length=1` is autoregressive decoding; `block_length=max_length` is MDLM/LLaDA with the prompt as
    clean context.

    Attributes:
      max_length: Slots per row, prompt included (BD3's sequence length); a multiple of `block_length`. A row with a
        prompt of `n` tokens generates `max_length - n` slots.
      block_length: Slots per block `L'`.
      steps_per_block: The step budget `S` of a block (default `block_length`: one commit per step with the
        transfer table). A block stops early once none of its slots is masked, so a block that the prompt half fills
        takes fewer steps.
      tokens: The model's special token ids. With `eos_id` set, a row that generates it is done once its block is
        finished: its later blocks hold `pad_id` and are frozen, and sampling stops when every row is done.
      proposal: `LladaProposal` (temperature, top-k / top-p, confidence "low_confidence" or "random", or "entropy"
        for `EntropyBound`). The model never proposes the mask id (SUBS).
      rule: The commit rule (default LLaDA's `TransferTable` over the block's masked slots). The parallel rules
        (`Threshold`, `Factor`, `EntropyBound`, `DreamThreshold`) commit the best masked slot of a block at every
        step plus every other slot they accept, so a block of `L'` slots takes at most `L'` steps (`DreamThreshold`:
        `S + L'`); `Threshold`, `Factor` and `EntropyBound` run until the block is filled and ignore
        `steps_per_block`.
        Every rule's block ends as soon as none of its slots is masked in a row that is not done (early stop: a
        fixed schedule whose budget is larger than the masked slots runs no pass that would commit nothing).
        `SubBlocks(n, inner)` (Fast-dLLM v2) lets only the first sub-block of `n` slots that holds a masked slot
        commit, by `inner`.
      cache_length: KV-cache slots per row; None sizes it exactly (`max_length - block_length`: the last block is
        never committed). Too small a value is an error, never a silent overwrite.
      fuse_commits: `generate_blocks` writes a finished block's K/V in the first forward of the next block (and
        seeds the first block from the prompt's prefill when it can) instead of in a forward of its own: the same
        tokens, fewer forwards (see `dlmjax.sampling.block`). Its `fuse_commits=` argument overrides this.
    """

    max_length: int
    block_length: int
    steps_per_block: int | None = None
    tokens: SpecialTokens
    proposal: Proposal = LladaProposal()
    rule: CommitRule = TransferTable()
    cache_length: int | None = None
    fuse_commits: bool = False

    def __post_init__(self):
        if self.steps_per_block is None and check.is_int(self.block_length):
            object.__setattr__(self, "steps_per_block", self.block_length)
        self.validate()

    @property
    def num_blocks(self) -> int:
        return self.max_length // self.block_length

    def validate(self) -> None:
        """Raises SettingsError naming the field, its value and what is allowed."""
        name = type(self).__name__
        for field in ("max_length", "block_length", "steps_per_block"):
            check.positive_int(name, field, getattr(self, field))
        check.block_grid(name, self.max_length, self.block_length)
        _check_parts(name, self)
        if isinstance(self.rule, SubBlocks) and self.block_length % self.rule.length:
            divisors = [d for d in range(1, self.block_length + 1) if self.block_length % d == 0]
            check.fail(name, "rule", self.rule, f"its sub-block length {self.rule.length} must divide block_length="
                       f"{self.block_length}; use one of {divisors}")
        if self.cache_length is not None:
            check.positive_int(name, "cache_length", self.cache_length)
        check.boolean(name, "fuse_commits", self.fuse_commits)

    @classmethod
    def bd3(cls, *, max_length: int, block_length: int, steps_per_block: int | None = None,
            remasking: str | None = None, threshold: float | None = None, factor: float | None = None,
            entropy_bound: float | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
            cache_length: int | None = None, fuse_commits: bool = False,
            tokens: SpecialTokens | None = None, mask_id: int | None = None, eos_id: int | None = None,
            pad_id: int | None = None) -> "BlockSamplerSettings":
        """Settings in flat keywords: in each block LLaDA's transfer table (`steps_per_block` steps), or with
        `threshold` (in (0, 1]) Fast-dLLM's threshold rule (each step commits the best masked slot plus every masked
        slot whose confidence is >= threshold), or with `factor` (> 0) its factor rule (`Factor`), or with
        `entropy_bound` (nats, >= 0) the entropy-bounded rule (`EntropyBound`: each step commits the lowest-entropy
        masked slots whose entropies sum to at most the bound, at least one); one of the three at most. Slots are
        ranked by `remasking` (low_confidence, the default, or random; entropy, the default and the only choice,
        with `entropy_bound`); proposals at `temperature` with top-k / top-p. `fuse_commits`: see the attribute."""
        rule = _parallel_rule(cls.__name__, threshold, factor, entropy_bound) or TransferTable()
        bounded = entropy_bound is not None
        if remasking is None:
            remasking = Confidence.ENTROPY if bounded else Confidence.LOW_CONFIDENCE
        # With entropy_bound any other ranking is named as a clash with the rule (`_check_parts`), not as unknown.
        allowed = BLOCK_CONFIDENCES + ((Confidence.ENTROPY,) if bounded else ())
        remasking = parse_choice(Confidence, remasking, owner=cls.__name__, field="remasking",  # the caller's name
                                 allowed=allowed)
        proposal = LladaProposal(temperature=temperature, top_k=top_k, top_p=top_p, confidence=remasking)
        return cls(max_length=max_length, block_length=block_length, steps_per_block=steps_per_block,
                   proposal=proposal, rule=rule, cache_length=cache_length, fuse_commits=fuse_commits,
                   tokens=special_tokens(tokens, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id))

    @classmethod
    def v2(cls, *, max_length: int, block_length: int, sub_block_length: int, threshold: float = 0.9,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, cache_length: int | None = None,
           tokens: SpecialTokens | None = None, mask_id: int | None = None, eos_id: int | None = None,
           pad_id: int | None = None) -> "BlockSamplerSettings":
        """Fast-dLLM v2 decoding in flat keywords: blocks of `block_length` against the exact block cache, each
        decoded sub-block by sub-block (`sub_block_length` slots, dividing `block_length`), left to right: every
        step forwards the whole block, and the first sub-block that still holds a masked slot commits its most
        confident masked slot plus every masked slot there with confidence >= `threshold` (`SubBlocks(n,
        Threshold(threshold))`). Commits are fused (`fuse_commits=True`): a finished block enters the cache in
        the forward that starts the next block; for a shifted model (`model.arch=dream`, Fast-dLLM v2's own
        convention) the finished block's last row in that forward is the logit that predicts the next block's
        first slot, v2's "seed". (v2 commits that seed token outright; here the rule decides, from the same
        logits, together with the rest of the first sub-block.)"""
        check.positive_int(cls.__name__, "sub_block_length", sub_block_length)  # under the caller's name
        rule = SubBlocks(sub_block_length, Threshold(threshold))
        proposal = LladaProposal(temperature=temperature, top_k=top_k, top_p=top_p)
        return cls(max_length=max_length, block_length=block_length, proposal=proposal, rule=rule,
                   cache_length=cache_length, fuse_commits=True,
                   tokens=special_tokens(tokens, mask_id=mask_id, eos_id=eos_id, pad_id=pad_id))


__all__ = ["BlockSamplerSettings", "CACHE_MODES", "SamplerSettings", "special_tokens"]
