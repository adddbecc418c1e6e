"""The `dlmjax` command line: train, plan, pack, sample, eval, convert, forward.

    dlmjax train --config configs/demo.yaml [--workdir DIR] [section.key=value ...]
    dlmjax plan --config configs/llada_8b.yaml [--devices 256] [--platform tpu|gpu|cpu] [section.key=value ...]
    dlmjax sample --checkpoint DIR --prompt TEXT [--gen-length N --steps S ...]
    dlmjax pack --config C --out STORE [section.key=value ...]     (then train with data.kind=packed data.path=STORE)
    dlmjax eval --checkpoint DIR [section.key=value ...]
    dlmjax convert --from-hf HF_DIR --arch llada|dream|mdlm|bd3lm --out CKPT
    dlmjax convert --to-hf CKPT --out HF_DIR
    dlmjax forward --checkpoint CKPT --input-ids IDS.npy [--sigma SIGMA.npy] --out LOGITS.npy
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dlmjax.checkpoint import CheckpointRestoreError
from dlmjax.config import ConfigError, apply_overrides, load_config


def _parse_ids(text: str) -> list[list[int]]:
    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError as e:
        raise SystemExit(f"--prompt-ids {text!r}: expected comma-separated integers, rows separated by ';' ({e})")


def cmd_train(args) -> int:
    from dlmjax.train.loop import exit_status, print_json, train_and_evaluate

    cfg = load_config(args.config, args.overrides)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    print(f"workdir: {workdir}", file=sys.stderr)
    result = train_and_evaluate(cfg, workdir, log=lambda s: print(s, file=sys.stderr))
    print_json(result)
    return exit_status(result)  # 143 if stopped by SIGTERM: rerun to resume


def cmd_plan(args) -> int:
    from dlmjax.train.plan import format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    hbm = None if args.hbm_gib is None else int(args.hbm_gib * 2 ** 30)
    print(format_plan(make_plan(cfg, args.devices, args.platform, hbm), cfg, args.platform))
    return 0


def cmd_pack(args) -> int:
    from dlmjax.config import ConfigError
    from dlmjax.data.formats import CorpusIndex
    from dlmjax.data.store import write_store
    from dlmjax.data.tokenizer import check_model_vocab, load_tokenizer

    cfg = load_config(args.config, args.overrides)
    d = cfg.data
    if d.kind != "corpus":
        raise ConfigError(f"dlmjax pack reads a corpus: data.kind={d.kind!r} must be 'corpus' (with data.path, "
                          "data.format and data.tokenizer)")
    tokenizer = load_tokenizer(d.tokenizer)
    try:
        check_model_vocab(tokenizer, vocab_size=cfg.model.vocab_size, mask_id=cfg.diffusion.mask_id)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    meta = write_store(CorpusIndex.build(d.path, d.format), tokenizer, args.out, seq_len=d.seq_len,
                       block_size=cfg.diffusion.block_size, packing=d.packing, text_field=d.text_field,
                       record_type=d.record_type, rows_per_file=args.rows_per_file)
    fill = meta.real_tokens / (meta.n_rows * meta.seq_len)
    print(json.dumps({"out": str(args.out), "rows": meta.n_rows, "documents": meta.n_documents,
                      "tokens": meta.real_tokens, "fill": round(fill, 4), "files": len(meta.files)}))
    print(f"train from it with: data.kind=packed data.path={args.out}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from dlmjax.checkpoint import load
    from dlmjax.train.loop import evaluate, print_json

    cfg, params = load(args.checkpoint)
    if args.overrides:
        cfg = apply_overrides(cfg, args.overrides)
    print_json(evaluate(cfg, params, show_examples=args.show, log=lambda s: print(s, file=sys.stderr)))
    return 0


REMASKING_RULES = ("low_confidence", "random")
FAST_FLAGS = ("cache", "threshold", "factor", "alg", "top_p", "top_k")


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
    flags = {"gen_length": args.gen_length, "steps": args.steps, "block_length": args.block_length,
             "steps_per_block": args.steps_per_block, "remasking": args.remasking, "temperature": args.temperature}
    if flags["remasking"] not in (None, *REMASKING_RULES):
        flags["remasking"] = None  # margin / entropy: masked sampler only, passed straight to its settings
    cfg = dataclasses.replace(cfg, sample=dataclasses.replace(
        cfg.sample, **{k: v for k, v in flags.items() if v is not None}))
    rng = jax.random.PRNGKey(args.seed)
    if uses_block_sampler(cfg):
        given = [f"--{f.replace('_', '-')}" for f in FAST_FLAGS if getattr(args, f) not in (None, "none")]
        if args.cfg_scale or given:
            raise SystemExit(f"{' '.join(given + (['--cfg-scale'] if args.cfg_scale else []))}: this checkpoint "
                             f"(diffusion.objective={cfg.diffusion.objective}) samples with the BD3 block sampler, "
                             "which has an exact KV cache and no guidance; these flags belong to the masked sampler")
        width = max(len(r) for r in rows)
        # Rows of different lengths are left-padded; the mask keeps the padding out of attention.
        prompt = np.zeros((len(rows), width), np.int32)
        prompt_mask = np.zeros((len(rows), width), bool)
        for i, r in enumerate(rows):
            prompt[i, width - len(r):] = r
            prompt_mask[i, width - len(r):] = True
        settings = sampler_settings(cfg, width)
        tokens, nfe = sample(cfg, params, prompt, rng, settings=settings, prompt_mask=prompt_mask)
        out, nfe = np.asarray(tokens).tolist(), int(nfe)  # the block sampler already drops padding
    else:
        out, nfe = _sample_masked(cfg, params, rows, rng, args)
    if args.json:
        print(json.dumps({"tokens": out, "nfe": nfe}))
    else:
        for row, r in zip(out, rows):
            print(tok.decode(row[len(r):]) if args.prompt is not None else row)
    return 0


def _sample_masked(cfg, params, rows, rng, args):
    """The masked sampler (LLaDA / Fast-dLLM / Dream) through `dlmjax.generate`: rows are prompt + generation."""
    from dlmjax.interchange import special_tokens
    from dlmjax.sampling import SamplerSettings
    from dlmjax.sampling.api import generate

    width = max(len(r) for r in rows)
    gen = args.gen_length or cfg.sample.gen_length or (cfg.data.seq_len - width)
    if gen <= 0:
        raise ValueError(f"--gen-length resolves to {gen}: the prompt ({width} tokens) fills data.seq_len="
                         f"{cfg.data.seq_len}; pass --gen-length")
    ids = special_tokens(args.checkpoint, cfg)
    common = dict(temperature=args.temperature if args.temperature is not None else cfg.sample.temperature,
                  cfg_scale=args.cfg_scale, top_p=args.top_p or 1.0, top_k=args.top_k or 0,
                  eos_id=ids.get("eos_id"), pad_id=ids.get("pad_id"))
    if args.stop_at_eos:
        common["stop_at_eos"] = True
    steps = args.steps or cfg.sample.steps or gen
    block = args.block_length or cfg.sample.block_length or gen
    if args.alg:
        if args.cache not in (None, "none") or args.factor is not None or args.remasking:
            raise SystemExit("--alg selects Dream's diffusion_generate; it takes no --cache, --factor or --remasking")
        settings = SamplerSettings.dream(max_new_tokens=gen, steps=steps, alg=args.alg, alg_temp=args.alg_temp,
                                         threshold=args.threshold, mask_id=cfg.diffusion.mask_id,
                                         block_length=block, model=cfg.model, **common)
    else:
        settings = SamplerSettings.for_model(
            cfg, gen_length=gen, steps=steps, block_length=block,
            remasking=args.remasking or cfg.sample.remasking, cache=args.cache or "none",
            threshold=args.threshold, factor=args.factor, **common)
    result = generate(params, rows, settings, rng)
    return result.rows(), result.nfe


def cmd_convert(args) -> int:
    from dlmjax.interchange import convert_from_hf, export_to_hf

    if args.from_hf is not None:
        if not args.arch:
            raise SystemExit("dlmjax convert --from-hf needs --arch (llada, dream, mdlm or bd3lm)")
        out = convert_from_hf(args.from_hf, args.arch, args.out)
        print(f"converted {args.from_hf} (--arch {args.arch}) -> {out}", file=sys.stderr)
    else:
        if args.arch:
            raise SystemExit("dlmjax convert --to-hf takes no --arch: the checkpoint records its architecture")
        out = export_to_hf(args.to_hf, args.out)
        print(f"exported {args.to_hf} -> {out}", file=sys.stderr)
    print(json.dumps({"out": str(out)}))
    return 0


def _load_npy(path: str, what: str):
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} file {path!r} is not a readable .npy array ({e})") from None


def cmd_forward(args) -> int:
    import numpy as np

    from dlmjax.checkpoint import load
    from dlmjax.interchange import forward_logits

    ids = _load_npy(args.input_ids, "--input-ids")
    sigma = _load_npy(args.sigma, "--sigma") if args.sigma else None
    cfg, params = load(args.checkpoint)
    logits = forward_logits(cfg, params, ids, sigma)
    np.save(args.out, logits)
    print(json.dumps({"out": args.out, "shape": list(logits.shape)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlmjax", description="Diffusion language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train (or resume) a run; prints final metrics as one JSON line")
    t.add_argument("--config", required=True, help="YAML file under configs/")
    t.add_argument("--workdir", help="where checkpoints, TensorBoard events and metrics.jsonl go")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    t.set_defaults(fn=cmd_train)

    pl = sub.add_parser("plan", help="bytes per device of a run on N (fake) devices: parameters, optimizer "
                        "state, activations; a table and one JSON line, nothing allocated")
    pl.add_argument("--config", required=True, help="YAML file under configs/")
    pl.add_argument("--devices", type=int, default=8, help="number of devices of the mesh (default 8)")
    pl.add_argument("--platform", choices=["tpu", "gpu", "cpu"], default="tpu",
                    help="sets the memory budget per device: tpu 16 GiB (v5e), gpu 80 GiB (H100), cpu none")
    pl.add_argument("--hbm-gib", type=float, help="memory per device in GiB (overrides --platform's budget)")
    pl.add_argument("overrides", nargs="*", help="section.key=value (e.g. mesh.fsdp=16 mesh.data=-1)")
    pl.set_defaults(fn=cmd_plan)

    pk = sub.add_parser("pack", help="tokenize and pack a corpus (data.kind=corpus) into a store of rows that "
                        "data.kind=packed trains from")
    pk.add_argument("--config", required=True, help="YAML config with the corpus (data.*) and model vocabulary")
    pk.add_argument("--out", required=True, help="new directory for the store")
    pk.add_argument("--rows-per-file", type=int, default=65536, help="rows per ArrayRecord file")
    pk.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    pk.set_defaults(fn=cmd_pack)

    s = sub.add_parser("sample", help="generate from a checkpoint with the jitted sampler")
    s.add_argument("--checkpoint", required=True, help="a training workdir or its checkpoints/ folder")
    s.add_argument("--prompt", help="text prompt (byte tokenizer, BOS prepended)")
    s.add_argument("--prompt-ids", help="token ids: 1,2,3 or rows 1,2,3;4,5,6")
    s.add_argument("--gen-length", type=int, help="generated slots (default: the rest of a training row)")
    s.add_argument("--steps", type=int, help="masked sampler: denoising steps over all blocks")
    s.add_argument("--block-length", type=int,
                   help="masked sampler: semi-AR block; block sampler (bd3 runs): block size (default: trained)")
    s.add_argument("--steps-per-block", type=int, help="block sampler: denoising steps per block")
    s.add_argument("--remasking", choices=["low_confidence", "random", "margin", "entropy"])
    s.add_argument("--temperature", type=float)
    s.add_argument("--cfg-scale", type=float, default=0.0, help="classifier-free guidance weight (masked sampler)")
    s.add_argument("--cache", choices=["none", "prefix", "dual"],
                   help="masked sampler: Fast-dLLM KV cache (default none)")
    s.add_argument("--threshold", type=float, help="parallel decoding: commit slots with confidence >= X "
                   "(Fast-dLLM; with --alg confidence_threshold, Dream's rule)")
    s.add_argument("--factor", type=float, help="parallel decoding: Fast-dLLM's factor rule")
    s.add_argument("--alg", choices=["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"],
                   help="Dream's diffusion_generate algorithm (one block over the generation by default)")
    s.add_argument("--alg-temp", type=float, default=0.0, help="Dream: sample committed slots (alg temperature)")
    s.add_argument("--top-p", type=float, help="nucleus filtering of each proposal")
    s.add_argument("--top-k", type=int, help="top-k filtering of each proposal")
    s.add_argument("--stop-at-eos", action="store_true", help="masked sampler: a row stops after the block "
                   "in which it generated EOS (later slots hold the pad id)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help='print {"tokens": [[...]], "nfe": N}: prompt + generation '
                   "per row")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="held-out NELBO perplexity and task exact match; prints one JSON line")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--show", type=int, default=5, help="print this many sampled problems")
    e.add_argument("overrides", nargs="*", help="section.key=value (e.g. sample.steps=2)")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("convert", help="import a Hugging Face checkpoint folder, or export one")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="config.json + model.safetensors (or shards + index)")
    way.add_argument("--to-hf", metavar="CKPT", help="a dlmjax checkpoint (from convert --from-hf, or llada/dream)")
    c.add_argument("--arch", help="with --from-hf: llada, dream, mdlm or bd3lm")
    c.add_argument("--out", required=True, help="the new dlmjax checkpoint (--from-hf) or Hugging Face folder")
    c.set_defaults(fn=cmd_convert)

    f = sub.add_parser("forward", help="one forward pass: raw float32 logits [B, L, V] to a .npy file")
    f.add_argument("--checkpoint", required=True, help="a dlmjax checkpoint or training workdir")
    f.add_argument("--input-ids", required=True, help=".npy of int token ids, [B, L] or [L]; a bd3 model given "
                   "2 x its length reads [x_t ; x_0] under the BD3 training mask")
    f.add_argument("--sigma", help=".npy noise levels [B] (DiT models: mdlm, bd3lm)")
    f.add_argument("--out", required=True, help="where to write the logits (.npy)")
    f.set_defaults(fn=cmd_forward)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, CheckpointRestoreError) as e:
        print(f"dlmjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
