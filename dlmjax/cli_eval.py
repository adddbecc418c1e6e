"""`dlmjax eval`'s scoring modes: lm-evaluation-harness tasks (`--lm-eval`) and generative perplexity (`--gen-ppl`).

Each flag is parsed and checked here and handed to one library call (`dlmjax.lm_eval.evaluate_tasks`,
`dlmjax.genppl.generative_perplexity_of_checkpoint`); the sampler flags are shared by both modes.
"""
from __future__ import annotations

import argparse
import json

from dlmjax.cli import _int_at_least, _log, _model_dtype, _real
from dlmjax.errors import DlmjaxError

# `dlmjax eval --lm-eval`: the flags that are `dlmjax.lm_eval.ModelArgs` fields of the same name, and the others.
LM_EVAL_MODEL_FLAGS = ("mc_num", "cfg_scale", "dtype", "attention", "seed", "group", "rolling_samples", "gen_length",
                       "steps", "steps_per_block", "block_length", "cache", "threshold", "factor", "temperature",
                       "remasking", "sub_block_length", "window_blocks")
LM_EVAL_RUN_FLAGS = ("batch_size", "no_greedy_check", "limit", "num_fewshot", "include_path", "apply_chat_template",
                     "log_samples", "output")
SAMPLER_FLAGS = ("gen_length", "steps", "steps_per_block", "block_length", "cache", "threshold", "factor",
                 "temperature", "remasking", "sub_block_length", "window_blocks")
GEN_PPL_FLAGS = ("judge", "samples")
LM_EVAL_BATCH_SIZE = 32  # LLaDA's harness default: rows per Monte Carlo round, prompts per generation batch


def cmd_lm_eval(args) -> int:
    """lm-evaluation-harness tasks on the checkpoint: lm-eval's table, then one JSON line of the scores."""
    try:
        from dlmjax.lm_eval import evaluate_tasks, scores
    except ImportError as e:
        if "lm_eval" not in str(e):
            raise
        raise DlmjaxError("--lm-eval needs lm-evaluation-harness: pip install 'dlmjax[eval]'") from None
    from lm_eval.utils import make_table, setup_logging

    setup_logging()  # lm-eval's progress (and dlmjax's tokens/s) on stderr, as its own command line shows it
    model_args = {field: getattr(args, field) for field in LM_EVAL_MODEL_FLAGS if getattr(args, field) is not None}
    if args.no_greedy_check:
        model_args["is_check_greedy"] = False
    results = evaluate_tasks(
        args.checkpoint, args.lm_eval, model_args=model_args, batch_size=args.batch_size or LM_EVAL_BATCH_SIZE,
        limit=args.limit, include_path=args.include_path, num_fewshot=args.num_fewshot,
        apply_chat_template=args.apply_chat_template, log_samples=args.log_samples, output=args.output,
        spell=lambda field: "--" + field.replace("_", "-"))  # errors name the flags (`--mc-num`)
    if results is not None:  # process 0 of a multi-process job
        results.pop("samples", None)
        print(make_table(results))
        if "groups" in results:
            print(make_table(results, "groups"))
        print(json.dumps(scores(results)))
    return 0


def cmd_gen_ppl(args) -> int:
    """Generative perplexity of the checkpoint's unconditional samples under a judge; one JSON line."""
    from dlmjax.genppl import generative_perplexity_of_checkpoint
    from dlmjax.inference import SampleRequest
    from dlmjax.train.result import print_json

    request = SampleRequest(**{f: getattr(args, f) for f in SAMPLER_FLAGS if getattr(args, f) is not None})
    print_json(generative_perplexity_of_checkpoint(args.checkpoint, args.judge, samples=args.samples or 64,
                                                   seed=args.seed or 0, batch_size=args.batch_size,
                                                   request=request, log=_log))
    return 0


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"{text!r} names no task; give task names separated by commas")
    return tasks


def _limit(text: str) -> float | int:
    value = _real(0.0, low_open=True, what="a number of documents >= 1, or a fraction in (0, 1)")(text)
    if value >= 1 and value != int(value):
        raise argparse.ArgumentTypeError(f"{text} is not allowed; use a whole number of documents, or a fraction "
                                         "in (0, 1)")
    return int(value) if value >= 1 else value


def add_flags(p: argparse.ArgumentParser) -> None:
    """`dlmjax eval --lm-eval TASKS` / `--gen-ppl --judge J` and the flags that go with them."""
    from dlmjax.sampling.choices import CacheKind, Confidence

    positive = _int_at_least(1)
    p.add_argument("--lm-eval", type=_task_list, metavar="TASKS", help="run lm-evaluation-harness tasks "
                   "(comma-separated; the shipped dlmjax_* tasks are included) instead of the run's own evaluation; "
                   "prints lm-eval's table and one JSON line of the scores")
    p.add_argument("--gen-ppl", action="store_true", help="generative perplexity of unconditional samples under "
                   "--judge (MDLM's protocol), with their unigram entropy; one JSON line")
    g = p.add_argument_group("with --gen-ppl")
    g.add_argument("--judge", metavar="JUDGE", help="a dlmjax AR run (bd3, block size 1) or hf:NAME_OR_FOLDER (a "
                   "Hugging Face causal LM; needs torch and transformers)")
    g.add_argument("--samples", type=_int_at_least(1), help="unconditional samples to draw (default 64)")
    g = p.add_argument_group("with --lm-eval (and, for --batch-size, --seed and the sampler flags, --gen-ppl)")
    g.add_argument("--batch-size", type=positive, help=f"rows per Monte Carlo round (a divisor of --mc-num) and "
                   f"prompts per generation batch (default {LM_EVAL_BATCH_SIZE})")
    g.add_argument("--mc-num", type=positive, help="Monte Carlo rows per log-likelihood (default 128; one-token "
                   "answers are exact with any)")
    g.add_argument("--limit", type=_limit, help="documents per task: a count, or a fraction in (0, 1)")
    g.add_argument("--num-fewshot", type=_int_at_least(0), help="few-shot examples (default: each task's)")
    g.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="another folder of task YAMLs (repeatable)")
    g.add_argument("--apply-chat-template", action="store_true",
                   help="wrap each prompt in the checkpoint's chat template")
    g.add_argument("--output", metavar="JSON", help="write lm-eval's full results to this new file")
    g.add_argument("--log-samples", action="store_true", help="with --output: every request and answer too")
    g.add_argument("--cfg-scale", type=_real(0.0, what="a number >= 0 (0 is off)"),
                   help="classifier-free guidance of likelihoods and generations (default 0)")
    g.add_argument("--no-greedy-check", action="store_true", help="skip the greedy check (is_greedy is False)")
    g.add_argument("--dtype", type=_model_dtype, help="run the model in bfloat16 or float32 (default: as saved)")
    g.add_argument("--attention", choices=["xla", "pallas", "pallas_interpret"], help="model.attention_impl")
    g.add_argument("--seed", type=_int_at_least(0), help="seed of the Monte Carlo masks and sampling (default 0)")
    g.add_argument("--group", type=positive, help="log-likelihood requests per compiled call (default 4)")
    g.add_argument("--rolling-samples", type=positive, help="noise draws per perplexity row (default 1)")
    g.add_argument("--gen-length", type=positive, help="generated slots (default: sample.gen_length, else the "
                   "rest of a training row; a request's max_gen_toks caps it)")
    g.add_argument("--steps", type=positive, help="masked sampler: denoising steps over all blocks")
    g.add_argument("--steps-per-block", type=positive, help="block sampler: denoising steps per block")
    g.add_argument("--block-length", type=positive, help="semi-AR block (block sampler: block size)")
    g.add_argument("--cache", choices=[str(c) for c in CacheKind], help="masked sampler: Fast-dLLM KV cache")
    g.add_argument("--threshold", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1]"),
                   help="parallel decoding: commit slots with confidence >= X")
    g.add_argument("--factor", type=_real(0.0, low_open=True, what="a number > 0"),
                   help="parallel decoding: Fast-dLLM's factor rule")
    g.add_argument("--temperature", type=_real(0.0, what="a number >= 0 (0 is greedy)"),
                   help="when a task's generation kwargs set none")
    g.add_argument("--remasking", choices=[str(c) for c in Confidence])
    g.add_argument("--sub-block-length", type=positive, help="block sampler: Fast-dLLM v2 sub-block decoding")
    g.add_argument("--window-blocks", type=_int_at_least(2), help="bd3 runs: D2F pipelined decoding, N blocks in "
                   "flight per forward")


def check_flags(parser: argparse.ArgumentParser, args) -> None:
    """`eval`: each mode's flags need the mode; the modes take no config overrides and exclude each other."""
    def given(fields):
        return [f for f in fields if getattr(args, f) not in (None, False, [])]

    def refuse(field, why):
        parser.error(f"argument --{field.replace('_', '-')}: {why}")

    if args.lm_eval is not None and args.gen_ppl:
        refuse("gen_ppl", "runs on its own; give either --lm-eval TASKS or --gen-ppl")
    if args.gen_ppl:
        if args.judge is None:
            refuse("judge", "--gen-ppl needs a judge: a dlmjax AR run (bd3, block size 1) or hf:NAME_OR_FOLDER")
        shared = {"batch_size", "seed", *SAMPLER_FLAGS}
        for field in given([*LM_EVAL_MODEL_FLAGS, *LM_EVAL_RUN_FLAGS]):
            if field not in shared:
                refuse(field, "applies to --lm-eval TASKS, not --gen-ppl")
    else:
        for field in given(GEN_PPL_FLAGS):
            refuse(field, "applies to --gen-ppl")
        if args.lm_eval is None:
            for field in given([*LM_EVAL_MODEL_FLAGS, *LM_EVAL_RUN_FLAGS]):
                refuse(field, "applies to --lm-eval TASKS or --gen-ppl")
    mode = "--lm-eval" if args.lm_eval is not None else "--gen-ppl" if args.gen_ppl else None
    if mode and args.overrides:
        parser.error(f"argument {mode}: takes no section.key=value overrides ({args.overrides[0]}); the "
                     f"checkpoint is evaluated as saved, with the sampler flags of {mode}")
    if args.log_samples and args.output is None:
        parser.error("argument --log-samples: the samples go into the --output file; give --output")
