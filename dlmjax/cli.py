"""The `dlmjax` command line: train, sample, eval.

    dlmjax train --config configs/demo.yaml [--workdir DIR] [section.key=value ...]
    dlmjax sample --checkpoint DIR --prompt TEXT [--gen-length N --steps S ...]
    dlmjax eval --checkpoint DIR [section.key=value ...]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlmjax.config import ConfigError, apply_overrides, load_config


def _parse_ids(text: str) -> list[list[int]]:
    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError as e:
        raise SystemExit(f"--prompt-ids {text!r}: expected comma-separated integers, rows separated by ';' ({e})")


def cmd_train(args) -> int:
    from dlmjax.train.loop import print_json, train_and_evaluate

    cfg = load_config(args.config, args.overrides)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    print(f"workdir: {workdir}", file=sys.stderr)
    result = train_and_evaluate(cfg, workdir, log=lambda s: print(s, file=sys.stderr))
    print_json(result)
    return 0


def cmd_eval(args) -> int:
    from dlmjax.checkpoint import load
    from dlmjax.train.loop import evaluate, print_json

    cfg, params = load(args.checkpoint)
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    print_json(evaluate(cfg, params, show_examples=args.show, log=lambda s: print(s, file=sys.stderr)))
    return 0


def cmd_sample(args) -> int:
    import dataclasses

    import jax
    import numpy as np

    from dlmjax.checkpoint import load
    from dlmjax.data.tokenizer import ByteTokenizer
    from dlmjax.evaluate import sample, sampler_settings, uses_block_sampler

    cfg, params = load(args.checkpoint)
    tok = ByteTokenizer()
    if (args.prompt is None) == (args.prompt_ids is None):
        raise SystemExit("give exactly one of --prompt TEXT or --prompt-ids 1,2,3[;4,5,6]")
    rows = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else [tok.encode(args.prompt, bos=True)]
    width = max(len(r) for r in rows)
    # Rows of different lengths are left-padded; the mask keeps the padding out of attention.
    prompt = np.zeros((len(rows), width), np.int32)
    prompt_mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        prompt[i, width - len(r):] = r
        prompt_mask[i, width - len(r):] = True
    flags = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
             "steps_per_block": args.steps_per_block, "remasking": args.remasking, "temperature": args.temperature}
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(
        cfg.sample, **{k: v for k, v in flags.items() if v is not None}))
    settings = sampler_settings(cfg, width)
    if args.cfg_scale:
        if uses_block_sampler(cfg):
            raise SystemExit("--cfg-scale: classifier-free guidance is implemented for the masked sampler only; "
                             f"this checkpoint (diffusion.objective={cfg.diffusion.objective}) uses the block sampler")
        settings = dataclasses.replace(settings, cfg_scale=args.cfg_scale)
    tokens, nfe = sample(cfg, params, prompt, jax.random.PRNGKey(args.seed), settings=settings,
                         prompt_mask=prompt_mask)
    tokens = np.asarray(tokens)
    # Each row as prompt + generation: the block sampler already drops padding, the masked one keeps it.
    out = [row.tolist() if uses_block_sampler(cfg) else row[width - len(r):].tolist() for row, r in zip(tokens, rows)]
    if args.json:
        print(json.dumps({"tokens": out, "nfe": int(nfe)}))
    else:
        for row, r in zip(out, rows):
            print(tok.decode(row[len(r):]) if args.prompt is not None else row)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlmjax", description="Diffusion language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run; prints final metrics as one JSON line")
    t.add_argument("--config", required=True, help="YAML file under configs/")
    t.add_argument("--workdir", help="where checkpoints, TensorBoard events and metrics.jsonl go")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("sample", help="generate from a checkpoint with the jitted sampler")
    s.add_argument("--checkpoint", required=True, help="a training workdir or its checkpoints/ folder")
    s.add_argument("--prompt", help="text prompt (byte tokenizer, BOS prepended)")
    s.add_argument("--prompt-ids", help="token ids: 1,2,3 or rows 1,2,3;4,5,6")
    s.add_argument("--gen-length", type=int, help="generated slots (default: the rest of a training row)")
    s.add_argument("--steps", type=int, help="masked sampler: denoising steps over all blocks")
    s.add_argument("--block-length", type=int,
                   help="masked sampler: semi-AR block; block sampler (bd3 runs): block size (default: trained)")
    s.add_argument("--steps-per-block", type=int, help="block sampler: denoising steps per block")
    s.add_argument("--remasking", choices=["low_confidence", "random"])
    s.add_argument("--temperature", type=float)
    s.add_argument("--cfg-scale", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help='print {"tokens": [[...]], "nfe": N}')
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="held-out NELBO perplexity and task exact match; prints one JSON line")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--show", type=int, default=5, help="print this many sampled problems")
    e.add_argument("overrides", nargs="*", help="section.key=value (e.g. sample.steps=2)")
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"dlmjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
