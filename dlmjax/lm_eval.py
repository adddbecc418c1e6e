"""dlmjax as an lm-evaluation-harness model: `--model dlmjax`, LLaDA's way of scoring a diffusion LM.

    python -m dlmjax.lm_eval --model dlmjax --model_args checkpoint=CKPT,mc_num=128 --batch_size 32 \\
        --tasks mmlu [--include_path DIR] [--apply_chat_template] [--log_samples --output_path OUT]
    dlmjax eval --checkpoint CKPT --lm-eval dlmjax_addition_mc,dlmjax_addition [--mc-num 128 --batch-size 32 ...]

lm-eval 0.4.13 finds no plugin models, so `python -m dlmjax.lm_eval` registers `DlmjaxLM` under the name `dlmjax`
and then runs lm-eval's own command line unchanged (every lm-eval flag works). `dlmjax eval --lm-eval` runs
`lm_eval.simple_evaluate` with an instance, the tasks shipped in `dlmjax.lm_eval_tasks` included.

The three request kinds:

* `loglikelihood` (multiple choice, LAMBADA-style): each (context, continuation) is tokenized as LLaDA's harness
  does (`encode_pair`), then scored by LLaDA's Monte Carlo estimator (`dlmjax.likelihood.log_likelihoods`: `mc_num`
  rows in rounds of `batch_size` stratified mask ratios, batched in width buckets) and, when `is_check_greedy`,
  checked for greedy agreement (`greedy_checks`). A one-token continuation's estimate is exact. A block-diffusion
  run (`diffusion.objective=bd3`) is scored with its own block-causal attention instead
  (`dlmjax.rolling.conditional_log_likelihoods`, the context as clean rows of its training grid): exactly for an
  autoregressive run (block size 1; greedy = every token is the next-token argmax), by minus the continuation's
  NELBO (mean of `rolling_samples` draws) for larger blocks.
* `loglikelihood_rolling` (perplexity): `dlmjax.rolling.rolling_log_likelihoods`, in nats: minus the NELBO for
  masked / block diffusion runs, the exact log-likelihood for autoregressive runs (BD3 with block size 1).
* `generate_until`: the sampler front door (`dlmjax.inference.sample_generation`), requests grouped by their
  generation settings into batches of `batch_size` prompts (the last one padded so shapes repeat). A request's
  `max_gen_toks` caps gen_length (`plan_generation`: fewer blocks, the same steps per block) and the tokens kept;
  its `until` strings and the checkpoint's EOS / end-of-turn tokens cut the text. Its `temperature` (`do_sample:
  false` is 0; lm-eval's default generation kwargs say so), `top_p` and `top_k` win over the model args, which win
  over the run's `sample.*` defaults. Tokens/s and forward passes are logged per call and summed in `totals`.

Model args (`--model_args k=v,...`; lm-eval hands them over as strings or numbers; `ModelArgs` checks them and
names the one that is wrong): `checkpoint` (required: a workdir, checkpoint or converted release), `mc_num` (128),
`cfg_scale` (0), `is_check_greedy` (True), `dtype` / `attention` (as `dlmjax sample`), `seed` (0), `group` (requests
per compiled likelihood call, 4), `rolling_samples` (noise draws per perplexity row, 1), and the sampler's
`gen_length`, `steps`, `steps_per_block`, `block_length`, `cache`, `threshold`, `factor`, `temperature`,
`remasking`, `sub_block_length` (Fast-dLLM v2 decoding) and `window_blocks` (D2F pipelined decoding).

Batch size: lm-eval's own `--batch_size` (it passes it to the constructor, so it cannot be a model arg): rows per
Monte Carlo round (`mc_num` must be a multiple of it) and prompts per generation batch (lm-eval's default 1;
`dlmjax eval --lm-eval` defaults to LLaDA's 32). `--batch_size auto` is refused: there is no memory probe.

Multi-host: one process per host (`dlmjax.distributed.maybe_initialize`), each with a full copy of the model on
its first device. `rank` / `world_size` are `jax.process_index()` / `jax.process_count()`, so lm-eval gives each
host its share of the documents and gathers the metrics through `all_gather` / `gather_object` / `barrier`
(`jax.experimental.multihost_utils`). lm-eval's multi-process path imports torch (it wraps a request count in a
tensor), so a job of several processes needs torch installed (the CPU build does); it is refused otherwise.
"""
from __future__ import annotations

import dataclasses
import logging
import pickle
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from dlmjax.errors import DlmjaxError, InputError, SettingsError
from dlmjax.lm_eval_args import (GenerationPlan, GenerationTotals, ModelArgs, _generation_kwargs, _model_arg,
                                 encode_pair, plan_generation)

MODEL_NAME = "dlmjax"
LIKELIHOOD_CHUNK = 8  # likelihood calls (of `group` requests each) per progress-bar update
eval_logger = logging.getLogger("lm_eval.models.dlmjax")  # lm-eval's own models log under lm_eval.models


# ---------------------------------------------------------------------------------------------------------------
# Collectives between processes (lm-eval's multi-process protocol)


def all_gather_array(value, allgather=None) -> np.ndarray:
    """[P, *shape]: `value` of every process, stacked in process order."""
    if allgather is None:
        from jax.experimental.multihost_utils import process_allgather as allgather  # noqa: PLC0415
    return np.asarray(allgather(np.asarray(value)))


def gather_objects(obj, *, dst: int = 0, index: int | None = None, allgather=None) -> list | None:
    """Every process's picklable `obj`, in process order, on process `dst`; None on the others.

    Objects travel as padded byte arrays: their lengths are gathered first, then the bytes."""
    import jax  # noqa: PLC0415

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = all_gather_array(np.int64(data.size), allgather).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    everything = all_gather_array(padded, allgather)
    if (jax.process_index() if index is None else index) != dst:
        return None
    return [pickle.loads(everything[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def _torch_installed() -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec("torch") is not None


def barrier(name: str = "dlmjax.lm_eval") -> None:
    from jax.experimental.multihost_utils import sync_global_devices  # noqa: PLC0415

    sync_global_devices(name)


# ---------------------------------------------------------------------------------------------------------------
# The model


class DlmjaxLM(LM):
    """A dlmjax checkpoint as an lm-eval `LM` (see the module docstring). Registered as `dlmjax`."""

    def __init__(self, checkpoint: str | None = None, batch_size=1, max_batch_size=None, device=None, **model_args):
        super().__init__()
        # `device` and `max_batch_size` are lm-eval's (its command line always passes a device, "cuda:0" by
        # default): JAX places the model on its default backend (JAX_PLATFORMS), and there is no auto batch size.
        del device, max_batch_size
        self.args = ModelArgs.parse({"checkpoint": checkpoint, "batch_size": batch_size, **model_args})
        from dlmjax.distributed import maybe_initialize  # noqa: PLC0415

        maybe_initialize()
        import jax  # noqa: PLC0415

        self._rank, self._world_size = jax.process_index(), jax.process_count()
        if self._world_size > 1 and not _torch_installed():
            raise SettingsError(f"this job has {self._world_size} processes, and lm-eval's multi-process path "
                                "imports torch; install torch (the CPU build does) or run one process",
                                field="world_size")
        from dlmjax.inference import open_run  # noqa: PLC0415

        self.run = open_run(self.args.checkpoint, dtype=self.args.dtype, attention=self.args.attention)
        self.totals = GenerationTotals()
        self._chat = False  # contexts are chat templates' text (written with their special tokens)
        self._warned: set = set()

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    # -- text ---------------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """A context as the checkpoint's text interface tokenizes a prompt; a chat template's text without added
        special tokens (the template wrote them)."""
        tokenizer = getattr(self.run.text, "tokenizer", None)
        if self._chat and hasattr(tokenizer, "get_vocab_size"):  # a release's `tokenizers.Tokenizer`
            return list(tokenizer.encode(text, add_special_tokens=False).ids)
        return self.run.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.encode, context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        render = getattr(self.run.text, "render_chat", None)
        if render is None:
            raise InputError(f"--apply_chat_template: {self.run.path} has no chat template (a converted release "
                             "ships one in tokenizer_config.json); evaluate without it")
        self._chat = True
        return render(chat_history, add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.run.text, "folder", None) or self.run.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str:
        template = getattr(self.run.text, "template", None)
        return template.source if template is not None else ""

    def get_model_info(self) -> dict:
        return {"dlmjax_checkpoint": str(self.run.path),
                "dlmjax_model_args": {k: v for k, v in dataclasses.asdict(self.args).items() if v is not None}}

    # -- collectives ----------------------------------------------------------------------------------------------
    def all_gather(self, tensor):
        gathered = all_gather_array(tensor)
        return tensor.new_tensor(gathered) if hasattr(tensor, "new_tensor") else gathered  # lm-eval gives torch

    def gather_object(self, obj, dst=0):
        return gather_objects(obj, dst=dst)

    def barrier(self) -> None:
        barrier()

    # -- requests -----------------------------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> list[int]:
        """The context cut from the left so that context + continuation fit the model (lm-eval's convention)."""
        cfg = self.run.config
        # A block-diffusion run scores one row of its training grid; a masked one any length its positions allow.
        limit = cfg.data.seq_len if cfg.diffusion.objective == "bd3" else cfg.model.max_seq_len
        if len(continuation) > limit:
            raise SettingsError(f"a continuation of {len(continuation)} tokens does not fit the model's "
                                f"{limit}-token rows", field="continuation")
        room = limit - len(continuation)
        if len(context) > room and "truncate" not in self._warned:
            self._warned.add("truncate")
            eval_logger.warning("contexts longer than the model's %d tokens lose their left end", limit)
        return context[max(len(context) - room, 0):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        import jax  # noqa: PLC0415

        from dlmjax.likelihood import greedy_checks, log_likelihoods  # noqa: PLC0415
        from dlmjax.rolling import conditional_log_likelihoods  # noqa: PLC0415
        from dlmjax.sampling import Denoiser  # noqa: PLC0415

        pairs = []
        for r in requests:
            context, continuation = self.encode_pair(*r.args)
            pairs.append((self._fit(context, continuation), continuation))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation: log 1, greedy
        todo = sorted((i for i, (_, a) in enumerate(pairs) if a), key=lambda i: -sum(map(len, pairs[i])))
        a = self.args
        denoiser, params, mask_id = Denoiser(self.run.config.model), self.run.params, self.run.tokens.mask_id
        block_diffusion = self.run.config.diffusion.objective == "bd3"
        chunk = a.group * LIKELIHOOD_CHUNK  # sorted by length: a chunk's requests share few width buckets
        with tqdm(total=len(todo), desc="dlmjax loglikelihood", disable=disable_tqdm or self.rank != 0) as bar:
            for n, start in enumerate(range(0, len(todo), chunk)):
                idx = todo[start:start + chunk]
                batch = [pairs[i] for i in idx]
                rng = jax.random.fold_in(jax.random.PRNGKey(a.seed), n)
                if block_diffusion:  # its own block-causal likelihood: exact for AR, the answer's NELBO else
                    logliks, greedy = conditional_log_likelihoods(self.run.config, params, batch, rng=rng,
                                                                  samples=a.rolling_samples,
                                                                  batch_size=a.batch_size)
                else:
                    logliks = log_likelihoods(denoiser, params, batch, mask_id=mask_id, mc_num=a.mc_num,
                                              batch_size=a.batch_size, cfg_scale=a.cfg_scale, rng=rng,
                                              group=a.group)
                    greedy = (greedy_checks(denoiser, params, batch, mask_id=mask_id, cfg_scale=a.cfg_scale,
                                            group=a.group) if a.is_check_greedy else [False] * len(batch))
                for i, ll, g in zip(idx, logliks, greedy):
                    out[i] = (float(ll), bool(g))
                    self.cache_hook.add_partial("loglikelihood", requests[i].args, out[i])
                bar.update(len(idx))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        import jax  # noqa: PLC0415

        from dlmjax.rolling import rolling_log_likelihoods  # noqa: PLC0415

        # Texts go in without a BOS: each scoring row gets one (clean context, never scored) as training rows do.
        bos = self.run.tokens.bos_id
        texts = [self.encode(r.args[0]) for r in requests]
        texts = [t[1:] if bos is not None and t[:1] == [bos] else t for t in texts]
        values = rolling_log_likelihoods(self.run.config, self.run.params, texts,
                                         rng=jax.random.PRNGKey(self.args.seed), samples=self.args.rolling_samples,
                                         batch_size=self.args.batch_size, bos_id=bos,
                                         progress=not disable_tqdm and self.rank == 0)
        out = [float(v) for v in np.asarray(values, np.float64)]  # an empty text scores 0 (log 1)
        for r, v in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, v)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [text for text, _ in self.generate_ids(requests, disable_tqdm=disable_tqdm)]

    def generate_ids(self, requests, disable_tqdm: bool = False) -> list[tuple[str, list[int]]]:
        """(text, generated ids kept) per request: `generate_until` with the token ids it decoded."""
        from dlmjax.inference import sample_generation  # noqa: PLC0415

        run, size = self.run, self.args.batch_size
        prompts, groups = [], {}
        for i, r in enumerate(requests):
            context, gen_kwargs = r.args
            cap, until, overrides = _generation_kwargs(gen_kwargs, self._warned)
            prompts.append((self.encode(context), cap, until))
            groups.setdefault((cap, tuple(sorted(overrides.items()))), []).append(i)
        # Every batch is planned (and its settings checked) before the first one runs.
        batches = []
        for (cap, overrides), idx in groups.items():
            idx = sorted(idx, key=lambda i: -len(prompts[i][0]))  # longest first: a too-big batch fails early
            for start in range(0, len(idx), size):
                part = idx[start:start + size]
                rows, plan = self._plan([prompts[i][0] for i in part], cap, dict(overrides))
                batches.append((part, rows, plan))
        out: list[tuple[str, list[int]]] = [("", [])] * len(requests)
        stops = {t for t in (run.tokens.eos_id, run.tokens.eot_id) if t is not None}
        start_time, tokens, nfe = time.perf_counter(), 0, 0
        for n, (part, rows, plan) in enumerate(tqdm(batches, desc="dlmjax generate_until",
                                                     disable=disable_tqdm or self.rank != 0)):
            rows = rows + [rows[-1]] * (size - len(rows))  # pad the batch: every batch of a plan has one shape
            result = sample_generation(run, rows, plan.request, seed=self.args.seed + n)
            nfe += result.nfe
            for i, ids in zip(part, result.generated()):
                ids = ids[:plan.keep]
                tokens += next((k for k, t in enumerate(ids) if t in stops), len(ids))
                out[i] = (run.generated_text(ids, stop=prompts[i][2]), ids)
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i][0])
        seconds = time.perf_counter() - start_time
        self.totals = self.totals.add(calls=1, requests=len(requests), tokens=tokens, seconds=seconds, nfe=nfe)
        eval_logger.info("dlmjax generate_until: %d requests in %d batches, %d tokens in %.1f s (%.1f tokens/s), "
                         "%d forward passes", len(requests), len(batches), tokens, seconds,
                         tokens / seconds if seconds else 0.0, nfe)
        return out

    def _plan(self, rows: list[list[int]], cap: int, overrides: dict) -> tuple[list[list[int]], GenerationPlan]:
        """A batch's prompts (cut from the left if prompt + generation would not fit the model, lm-eval's
        convention) and its `plan_generation`, checked; an error names the model arg."""
        cfg, longest = self.run.config, max(len(r) for r in rows)
        plan = plan_generation(cfg, self.args, longest, cap, overrides)
        over = longest + plan.request.gen_length - cfg.model.max_seq_len
        if over > 0 and longest - over >= 1:
            if "truncate" not in self._warned:
                self._warned.add("truncate")
                eval_logger.warning("contexts longer than the model's %d tokens lose their left end",
                                    cfg.model.max_seq_len)
            longest -= over
            rows = [r[max(len(r) - longest, 0):] for r in rows]
            plan = plan_generation(cfg, self.args, longest, cap, overrides)
        try:
            self.run.settings(longest, plan.request)
        except SettingsError as e:
            known = {f.name for f in dataclasses.fields(ModelArgs)}
            name = _model_arg(e.field) if e.field in known else "generation"
            raise SettingsError(f"{name}: {' '.join(str(e).split())}", field=e.field) from None
        return rows, plan


if __name__ != "__main__":  # `python -m` runs this file as __main__: the importable copy registers (below)
    register_model(MODEL_NAME)(DlmjaxLM)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def tasks_dirs(include_path: Sequence[str | Path] = ()) -> list[str]:
    """The shipped task folder (`dlmjax.lm_eval_tasks.TASKS_DIR`), then the user's."""
    from dlmjax.lm_eval_tasks import TASKS_DIR  # noqa: PLC0415

    return [str(TASKS_DIR), *map(str, include_path)]


def evaluate_tasks(checkpoint: str, tasks: Sequence[str], *, model_args: dict | None = None, batch_size: int = 1,
                   limit: float | None = None, include_path: Sequence[str | Path] = (), num_fewshot: int | None = None,
                   apply_chat_template: bool = False, log_samples: bool = False, output: str | Path | None = None,
                   spell: Callable[[str], str] = _model_arg, include_defaults: bool = True) -> dict | None:
    """lm-eval's results for `tasks` on a checkpoint (`dlmjax eval --lm-eval`); None on processes other than 0.

    Everything the user gave is checked before the checkpoint is read: the model args (errors spelled by
    `spell`), the include folders, the task names, and `output` (a new JSON file for the results)."""
    ModelArgs.parse({"checkpoint": checkpoint, "batch_size": batch_size, **(model_args or {})}, spell)
    if output is not None and Path(output).exists():
        raise FileExistsError(17, f"{output} exists; give a new file name (nothing is overwritten)", str(output))
    for folder in include_path:
        if not Path(folder).is_dir():
            raise FileNotFoundError(2, f"the task folder {folder} does not exist", str(folder))
    from lm_eval import simple_evaluate  # noqa: PLC0415
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    manager = TaskManager(include_path=tasks_dirs(include_path), include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]  # a name, or a YAML
    if unknown:
        raise InputError(f"--lm-eval: unknown task {unknown[0]!r}; the shipped tasks are "
                         f"{sorted(t for t in manager.all_tasks if t.startswith('dlmjax_'))} (add folders with "
                         "--include-path; `lm-eval ls tasks` lists lm-eval's own)")
    lm = DlmjaxLM(checkpoint, batch_size=batch_size, **(model_args or {}))
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                              task_manager=manager, log_samples=log_samples,
                              apply_chat_template=apply_chat_template, fewshot_as_multiturn=apply_chat_template)
    if results is not None and output is not None:
        import json  # noqa: PLC0415

        from lm_eval.utils import handle_non_serializable  # noqa: PLC0415

        Path(output).write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return results


def scores(results: dict) -> dict:
    """{task: {metric: value, "sample_len": documents}} of lm-eval's results (its names, aliases and "N/A" stderr
    placeholders left out)."""
    return {task: {k: v for k, v in metrics.items() if k not in ("alias", "name") and v != "N/A"}
            for task, metrics in results["results"].items()}


def cli_evaluate(argv: Sequence[str] | None = None) -> int:
    """`python -m dlmjax.lm_eval ...`: lm-eval's own command line with the `dlmjax` model registered. A user error
    of the dlmjax model is one line and status 2, as on the dlmjax command line."""
    from dlmjax.distributed import maybe_initialize  # noqa: PLC0415

    maybe_initialize()  # before anything touches a device
    from lm_eval.__main__ import cli_evaluate as harness  # noqa: PLC0415

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        harness()
    except DlmjaxError as e:
        print(f"dlmjax.lm_eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


__all__ = ["DlmjaxLM", "GenerationPlan", "GenerationTotals", "MODEL_NAME", "ModelArgs", "all_gather_array",
           "barrier", "cli_evaluate", "encode_pair", "evaluate_tasks", "gather_objects", "plan_generation", "scores",
           "tasks_dirs"]

if __name__ == "__main__":
    from dlmjax.lm_eval import cli_evaluate as _main  # the importable module: the one that registered the model

    sys.exit(_main())
