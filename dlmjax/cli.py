"""The `dlmjax` command line: train, plan, pack, sample, eval, convert, forward.

    dlmjax train --config configs/demo.yaml [--workdir DIR] [section.key=value ...]
    dlmjax plan --config configs/llada_8b.yaml [--devices 256] [--platform tpu|gpu|cpu] [section.key=value ...]
    dlmjax plan --sample --config C | --checkpoint CKPT [--mesh fsdp=8,tensor=1] [--batch B --length N --dtype D]
    dlmjax sample --checkpoint DIR --prompt TEXT [--chat [--system S]] [--stop STR ...] [--gen-length N ...]
    dlmjax chat --checkpoint DIR [--system S] [sampler flags as for sample]
    dlmjax pack --config C --out STORE [section.key=value ...]     (then train with data.kind=packed data.path=STORE)
    dlmjax eval --checkpoint DIR [section.key=value ...]
    dlmjax eval --checkpoint DIR --lm-eval TASKS [--mc-num N --batch-size B --limit N --output PATH ...]
    dlmjax eval --checkpoint DIR --gen-ppl --judge AR_RUN|hf:NAME [--samples N --batch-size B sampler flags]
    dlmjax convert --from-hf HF_DIR --arch llada|dream|mdlm|bd3lm --out CKPT [--mask-id N]
    dlmjax convert --to-hf CKPT --out HF_DIR
    dlmjax forward --checkpoint CKPT --input-ids IDS.npy [--sigma SIGMA.npy] --out LOGITS.npy

Each subcommand parses its flags and calls one library function; nothing else lives here. A user's mistake
(`dlmjax.errors.DlmjaxError`, or a file that is missing, exists already or cannot be written) is printed as one
line naming the flag, field or file, and the command exits with status 2; anything else is a bug in dlmjax and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from dlmjax.errors import DlmjaxError

USER_ERROR_STATUS = 2
# Commands whose peak host memory is a checkpoint being read or written (see `dlmjax.hostmem`).
CHECKPOINT_COMMANDS = ("convert", "sample", "chat", "forward", "eval")


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_train(args) -> int:
    from dlmjax.config import load_config
    from dlmjax.train.loop import train_and_evaluate
    from dlmjax.train.result import exit_status, print_json

    cfg = load_config(args.config, args.overrides)
    workdir = Path(args.workdir or Path("runs") / Path(args.config).stem)
    result = train_and_evaluate(cfg, workdir, log=_log)
    print_json(result)
    return exit_status(result)  # 143 if stopped by SIGTERM: rerun to resume


def cmd_plan(args) -> int:
    from dlmjax.config import apply_overrides, load_config

    if args.checkpoint is not None:
        from dlmjax.checkpoint import read_config

        cfg = apply_overrides(read_config(args.checkpoint), args.overrides)
    else:
        cfg = load_config(args.config, args.overrides)
    devices = args.devices or 8
    if args.mesh is not None:
        cfg = dataclasses.replace(cfg, mesh=_mesh_config(args.mesh, cfg.mesh.rules))
        devices = args.devices or math.prod(args.mesh.values())
    hbm = None if args.hbm_gib is None else int(args.hbm_gib * 2 ** 30)
    if args.sample:
        from dlmjax.sampling.plan import format_sample_plan, make_sample_plan

        plan = make_sample_plan(cfg, devices, args.platform, hbm, batch=args.batch or 1, length=args.length,
                                dtype=args.dtype, cache=args.cache, guidance=args.guidance,
                                block_length=args.block_length)
        print(format_sample_plan(plan, cfg, args.platform))
        return 0
    from dlmjax.train.plan import format_plan, make_plan

    print(format_plan(make_plan(cfg, devices, args.platform, hbm), cfg, args.platform))
    return 0


def cmd_pack(args) -> int:
    from dlmjax.config import load_config
    from dlmjax.data.store import pack_corpus

    summary = pack_corpus(load_config(args.config, args.overrides), args.out, rows_per_file=args.rows_per_file)
    print(json.dumps(summary))
    _log(f"train from it with: data.kind=packed data.path={args.out}")
    return 0


def cmd_eval(args) -> int:
    from dlmjax import cli_eval

    if args.lm_eval is not None:
        return cli_eval.cmd_lm_eval(args)
    if args.gen_ppl:
        return cli_eval.cmd_gen_ppl(args)
    from dlmjax.evaluate import evaluate_checkpoint
    from dlmjax.train.result import print_json

    print_json(evaluate_checkpoint(args.checkpoint, args.overrides, show_examples=args.show, log=_log))
    return 0


def cmd_sample(args) -> int:
    from dlmjax.inference import block_edges, sample_generation
    from dlmjax.text import conversation

    if args.trace is not None and Path(args.trace).exists():
        raise FileExistsError(17, f"--trace {args.trace} exists; give a new file name (nothing is overwritten)",
                              args.trace)
    run = _open_run(args)
    if args.prompt_ids is not None:
        rows = _parse_ids(args.prompt_ids)
    elif args.chat:
        rows = [run.encode_chat(conversation(args.prompt, args.system))]
    else:
        rows = [run.encode(args.prompt)]
    show = _block_printer(run, rows) if args.trace_text else None
    result = sample_generation(run, rows, _request(args), seed=args.seed, on_block=show,
                               trace=args.trace is not None)
    out, nfe = result.rows(), result.nfe
    if args.trace is not None:
        from dlmjax.trace import draw_commit_order

        settings = run.settings(max(len(r) for r in rows), _request(args))
        lengths = [len(r) for r in rows]
        path = draw_commit_order(args.trace, result.commit_steps(), lengths, block_edges(settings, lengths),
                                 nfe=nfe, title=f"{run.path.name}: commit order, {nfe} forward passes")
        _log(f"commit order drawn to {path}")
    texts = ([run.generated_text(row[len(prompt):], args.stop) for row, prompt in zip(out, rows)]
             if run.text is not None else None)
    if args.json:
        print(json.dumps({"tokens": out, **({"text": texts} if texts is not None else {}), "nfe": nfe}))
    elif texts is not None:
        for text in texts:
            print(text)
    else:
        for row in out:
            print(row)
    return 0


def _block_printer(run, prompts):
    """`--trace-text`: each row's canvas (generation only, masked slots as `_`) after every finished block."""
    from dlmjax.trace import canvas_text

    def show(block, rows):
        for i, (row, prompt) in enumerate(zip(rows, prompts)):
            generated = row[len(prompt):]
            text = (canvas_text(run.decode, generated, run.tokens.mask_id) if run.text is not None
                    else " ".join("_" if t == run.tokens.mask_id else str(t) for t in generated))
            _log(f"block {block} row {i}: {text}")

    return show


def cmd_chat(args) -> int:
    from dlmjax.chat import chat_loop

    chat_loop(_open_run(args), _request(args), system=args.system, stop=args.stop, seed=args.seed)
    return 0


def _open_run(args):
    """The checkpoint of `sample` / `chat`, on the `--mesh` (default one device) in the `--dtype` given."""
    from dlmjax.inference import open_run

    mesh = None
    if args.mesh is not None:
        from dlmjax.sharding import make_mesh

        mesh = make_mesh(_mesh_config(args.mesh))
    return open_run(args.checkpoint, mesh=mesh, dtype=args.dtype, attention=args.attention)


def _request(args):
    """The sampler flags of `sample` and `chat` as a `SampleRequest` (unset flags keep the run's defaults)."""
    from dlmjax.inference import SampleRequest

    return SampleRequest(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        steps_per_block=args.steps_per_block, remasking=args.remasking, temperature=args.temperature,
        cfg_scale=args.cfg_scale, cache=args.cache, threshold=args.threshold, factor=args.factor,
        entropy_bound=args.entropy_bound, alg=args.alg,
        alg_temp=args.alg_temp, top_p=args.top_p, top_k=args.top_k, stop_at_eos=args.stop_at_eos or None,
        sub_block_length=args.sub_block_length, window_blocks=args.window_blocks,
        block_add_threshold=args.block_add_threshold, decoded_token_threshold=args.decoded_token_threshold)


def _parse_ids(text: str) -> list[list[int]]:
    from dlmjax.errors import InputError

    try:
        return [[int(t) for t in row.split(",") if t.strip()] for row in text.split(";")]
    except ValueError:
        raise InputError(f"--prompt-ids={text!r} is not allowed; give comma-separated integers, rows separated by "
                         "';' (e.g. 1,2,3;4,5)") from None


def cmd_convert(args) -> int:
    from dlmjax.interchange import convert_from_hf, export_to_hf

    if args.from_hf is not None:
        out = convert_from_hf(args.from_hf, args.arch, args.out, mask_id=args.mask_id)
        _log(f"converted {args.from_hf} (--arch {args.arch}) -> {out}")
    else:
        out = export_to_hf(args.to_hf, args.out)
        _log(f"exported {args.to_hf} -> {out}")
    print(json.dumps({"out": str(out)}))
    return 0


def cmd_forward(args) -> int:
    from dlmjax.interchange import forward_to_file

    print(json.dumps(forward_to_file(args.checkpoint, args.input_ids, args.out, sigma_path=args.sigma)))
    return 0


# -- flags ------------------------------------------------------------------------------------------------------


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; use an integer >= {low}")
        return value

    return parse


def _real(low: float, high: float | None = None, *, low_open: bool = False, what: str = ""):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bad = value != value or value in (float("inf"), float("-inf")) or value < low or (low_open and value == low)
        if high is not None and value > high:
            bad = True
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is not allowed; use {what}")
        return value

    return parse


MODEL_DTYPES = ("bfloat16", "float32")  # what `model.dtype` / `model.param_dtype` take


def _model_dtype(text: str) -> str:
    if text not in MODEL_DTYPES:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; the model runs in a floating dtype: "
                                         f"{' or '.join(MODEL_DTYPES)}")
    return text


def _mesh_sizes(text: str) -> dict[str, int]:
    """`fsdp=8,tensor=1` -> {"data": 1, "fsdp": 8, "tensor": 1} (unnamed axes 1; one size may be -1: the rest)."""
    from dlmjax.config import MESH_AXES

    example = "e.g. fsdp=8,tensor=1"
    sizes = {}
    for item in text.split(","):
        axis, eq, value = item.strip().partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"{text!r}: {item.strip()!r} is not axis=size; give sizes such as "
                                             f"{example} (axes {', '.join(MESH_AXES)})")
        if axis not in MESH_AXES:
            raise argparse.ArgumentTypeError(f"{text!r}: unknown mesh axis {axis!r}; the axes are "
                                             f"{', '.join(MESH_AXES)} ({example})")
        if axis in sizes:
            raise argparse.ArgumentTypeError(f"{text!r}: axis {axis!r} is given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1 and size != -1:
            raise argparse.ArgumentTypeError(f"{text!r}: {axis}={value!r} is not allowed; a size is an integer >= 1 "
                                             "(or -1 for the remaining devices, on one axis)")
        sizes[axis] = size
    if list(sizes.values()).count(-1) > 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at most one axis may be -1")
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def _mesh_config(sizes: dict[str, int], rules=None):
    from dlmjax.config import MeshConfig

    return MeshConfig(**sizes) if rules is None else MeshConfig(**sizes, rules=rules)


def _mesh_text(sizes: dict[str, int]) -> str:
    return ",".join(f"{axis}={n}" for axis, n in sizes.items())


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) with status 2, like every other user error."""

    def error(self, message):  # noqa: D102
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dlmjax", description="Diffusion language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    positive = _int_at_least(1)

    t = sub.add_parser("train", help="train (or resume) a run; prints final metrics as one JSON line")
    t.add_argument("--config", required=True, help="YAML file under configs/")
    t.add_argument("--workdir", help="where checkpoints, TensorBoard events and metrics.jsonl go")
    t.add_argument("overrides", nargs="*", help="section.key=value")
    t.set_defaults(fn=cmd_train)

    pl = sub.add_parser("plan", help="bytes per device of a run on N (fake) devices: parameters, optimizer "
                        "state, activations; a table and one JSON line, nothing allocated")
    source = pl.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML file under configs/")
    source.add_argument("--checkpoint", help="a checkpoint's config instead (a converted release or a run)")
    pl.add_argument("--devices", type=positive, help="number of devices of the mesh (default 8, or the product "
                    "of --mesh)")
    pl.add_argument("--mesh", type=_mesh_sizes, help="mesh sizes data=D,fsdp=F,tensor=T (unnamed axes are 1), "
                    "replacing mesh.data/fsdp/tensor")
    pl.add_argument("--sample", action="store_true", help="the memory of sampling instead of training: "
                    "parameters in --dtype, the sampler's KV cache, the largest forward's transients")
    pl.add_argument("--batch", type=positive, help="--sample: rows sampled at once (default 1)")
    pl.add_argument("--length", type=positive, help="--sample: slots per row, prompt + generation (default "
                    "data.seq_len)")
    pl.add_argument("--dtype", type=_model_dtype, help="--sample: the dtype the model runs in, as `dlmjax sample "
                    "--dtype` (parameters, activations, KV cache; default: the config's)")
    pl.add_argument("--cache", choices=["none", "prefix", "dual"], help="--sample, masked sampler: its KV cache "
                    "(default dual; prefix holds as much)")
    pl.add_argument("--guidance", action="store_true", help="--sample, masked sampler: classifier-free guidance "
                    "(doubles the rows)")
    pl.add_argument("--block-length", type=positive, help="--sample, block sampler (bd3 runs): the block size "
                    "(default: sample.block_length, else diffusion.block_size)")
    pl.add_argument("--platform", choices=["tpu", "gpu", "cpu"], default="tpu",
                    help="sets the memory budget per device: tpu 16 GiB (v5e), gpu 80 GiB (H100), cpu none")
    pl.add_argument("--hbm-gib", type=_real(0.0, low_open=True, what="a number of GiB > 0"),
                    help="memory per device in GiB (overrides --platform's budget)")
    pl.add_argument("overrides", nargs="*", help="section.key=value (e.g. mesh.fsdp=16 mesh.data=-1)")
    pl.set_defaults(fn=cmd_plan)

    pk = sub.add_parser("pack", help="tokenize and pack a corpus (data.kind=corpus) into a store of rows that "
                        "data.kind=packed trains from")
    pk.add_argument("--config", required=True, help="YAML config with the corpus (data.*) and model vocabulary")
    pk.add_argument("--out", required=True, help="new directory for the store")
    pk.add_argument("--rows-per-file", type=positive, default=65536, help="rows per ArrayRecord file")
    pk.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    pk.set_defaults(fn=cmd_pack)

    s = sub.add_parser("sample", help="generate from a checkpoint with the jitted sampler")
    s.add_argument("--checkpoint", required=True, help="a training workdir, its checkpoints/ folder, or an export")
    prompt = s.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text prompt, encoded with the checkpoint's own tokenizer (a run trained "
                        "here: BOS first, as its training rows; a converted release: as its reference scripts do)")
    prompt.add_argument("--prompt-ids", help="token ids: 1,2,3 or rows 1,2,3;4,5,6")
    _add_sampler_flags(s)
    s.add_argument("--chat", action="store_true", help="wrap --prompt in the checkpoint's chat template (a user "
                   "turn, then the assistant's header), as the release's chat script does")
    s.add_argument("--system", help="with --chat: a system message before the user's turn")
    _add_load_flags(s)
    s.add_argument("--trace", metavar="PNG", help="draw when each slot was committed (slots x forward passes, "
                   "prompt shaded, block edges marked) to this new file; needs matplotlib (the plot extra)")
    s.add_argument("--trace-text", action="store_true", help="print each row's canvas after every finished block "
                   "(masked slots as _) to stderr")
    s.add_argument("--json", action="store_true", help='print {"tokens": [[prompt + generation ids]], "text": '
                   '["generated text"], "nfe": N} ("text" when the checkpoint has a tokenizer)')
    s.set_defaults(fn=cmd_sample)

    ch = sub.add_parser("chat", help="talk with a checkpoint through its chat template (an interactive loop that "
                        "keeps the conversation and shows each block as it is committed)")
    ch.add_argument("--checkpoint", required=True, help="a converted release with a chat template")
    ch.add_argument("--system", help="a system message at the start of the conversation")
    _add_sampler_flags(ch)
    _add_load_flags(ch)
    ch.set_defaults(fn=cmd_chat)

    e = sub.add_parser("eval", help="held-out NELBO perplexity and task exact match; prints one JSON line")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--show", type=_int_at_least(0), default=5, help="print this many sampled problems")
    e.add_argument("overrides", nargs="*", help="section.key=value (e.g. sample.steps=2)")
    from dlmjax import cli_eval

    cli_eval.add_flags(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("convert", help="import a Hugging Face checkpoint folder, or export one")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="config.json + model.safetensors (or shards + index)")
    way.add_argument("--to-hf", metavar="CKPT", help="a dlmjax checkpoint (from convert --from-hf, or llada/dream)")
    # No argparse `choices`: the interchange checks the value and names what is allowed in its own words.
    c.add_argument("--arch", help="with --from-hf (required there): the architecture of the folder: llada, dream, "
                   "mdlm or bd3lm")
    c.add_argument("--out", required=True, help="the new dlmjax checkpoint (--from-hf) or Hugging Face folder")
    c.add_argument("--mask-id", type=_int_at_least(0), metavar="N",
                   help="--arch dream with a plain Qwen2ForCausalLM / LlamaForCausalLM folder (no mask token): the "
                   "embedding row used as the mask, not bos/eos/pad; which unused row is your choice (Fast-dLLM v2 "
                   "uses 151665 for Qwen2.5)")
    c.set_defaults(fn=cmd_convert)

    f = sub.add_parser("forward", help="one forward pass: raw float32 logits [B, L, V] to a .npy file")
    f.add_argument("--checkpoint", required=True, help="a dlmjax checkpoint or training workdir")
    f.add_argument("--input-ids", required=True, help=".npy of int token ids, [B, L] or [L]; a bd3 model given "
                   "2 x its length reads [x_t ; x_0] under the BD3 training mask")
    f.add_argument("--sigma", help=".npy noise levels [B] (DiT models: mdlm, bd3lm)")
    f.add_argument("--out", required=True, help="where to write the logits (.npy)")
    f.set_defaults(fn=cmd_forward)
    return p


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """Where and in which dtype `sample` and `chat` load the checkpoint (`_open_run`)."""
    p.add_argument("--mesh", type=_mesh_sizes, help="shard the parameters over a mesh of this process's devices: "
                   "data=D,fsdp=F,tensor=T (unnamed axes are 1; the product is the device count), e.g. "
                   "fsdp=8,tensor=1; each parameter is read straight into its sharding")
    p.add_argument("--dtype", type=_model_dtype, help="run the model in bfloat16 or float32 (default: as saved): "
                   "parameters cast while loading, activations and KV cache in it too; norms, softmax, logits and "
                   "confidences stay float32")
    p.add_argument("--attention", choices=["xla", "pallas", "pallas_interpret"],
                   help="model.attention_impl: pallas runs the Pallas kernels on TPU / GPU, every cached sampling "
                   "step included (pallas_interpret: the same kernels on CPU, slow); default: the checkpoint's")


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    """The sampler flags `sample` and `chat` share; unset flags keep the checkpoint's `sample.*` defaults."""
    from dlmjax.sampling.choices import CacheKind, Confidence, DreamAlg

    positive = _int_at_least(1)
    p.add_argument("--gen-length", type=positive, help="generated slots (default: the rest of a training row)")
    p.add_argument("--steps", type=positive, help="masked sampler: denoising steps over all blocks")
    p.add_argument("--block-length", type=positive,
                   help="masked sampler: semi-AR block; block sampler (bd3 runs): block size (default: trained)")
    p.add_argument("--steps-per-block", type=positive, help="block sampler: denoising steps per block")
    p.add_argument("--remasking", choices=[str(c) for c in Confidence])
    p.add_argument("--temperature", type=_real(0.0, what="a number >= 0 (0 is greedy)"))
    p.add_argument("--cfg-scale", type=_real(0.0, what="a number >= 0 (0 is off)"),
                   help="classifier-free guidance weight (masked sampler)")
    p.add_argument("--cache", choices=[str(c) for c in CacheKind],
                   help="masked sampler: Fast-dLLM KV cache (default none)")
    p.add_argument("--threshold", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1]"),
                   help="parallel decoding: commit slots with confidence >= X (Fast-dLLM; with --alg "
                   "confidence_threshold, Dream's rule)")
    p.add_argument("--factor", type=_real(0.0, low_open=True, what="a number > 0"),
                   help="parallel decoding: Fast-dLLM's factor rule")
    p.add_argument("--entropy-bound", type=_real(0.0, what="a number of nats >= 0"),
                   help="parallel decoding: commit the lowest-entropy masked slots while their summed entropy "
                   "stays <= X (at least one per step; ranks by entropy)")
    p.add_argument("--sub-block-length", type=positive,
                   help="block sampler: Fast-dLLM v2 decoding, sub-blocks of N slots (dividing the block) committed "
                   "left to right by --threshold (default 0.9)")
    p.add_argument("--window-blocks", type=_int_at_least(2),
                   help="bd3 runs: D2F pipelined decoding with N blocks in flight per forward (--threshold is its "
                   "skip threshold, default 0.9); best with runs trained with diffusion.context=noisy")
    p.add_argument("--block-add-threshold", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1]"),
                   help="D2F: start the next block once the last one is this fraction decoded (default 0.1)")
    p.add_argument("--decoded-token-threshold", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1]"),
                   help="D2F: a block commits at least one slot per pass once its predecessor is this fraction "
                   "decoded (default 0.5)")
    p.add_argument("--alg", choices=[str(a) for a in DreamAlg],
                   help="Dream's diffusion_generate algorithm (one block over the generation by default)")
    p.add_argument("--alg-temp", type=_real(0.0, what="a number >= 0"),
                   help="Dream: sample committed slots (alg temperature)")
    p.add_argument("--top-p", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1] (1 is off)"),
                   help="nucleus filtering of each proposal")
    p.add_argument("--top-k", type=_int_at_least(0), help="top-k filtering of each proposal (0 is off)")
    p.add_argument("--stop-at-eos", action="store_true", help="masked sampler: a row stops after the block "
                   "in which it generated EOS (later slots hold the pad id)")
    p.add_argument("--stop", nargs="+", default=(), metavar="STR",
                   help="cut the printed text before the first of these strings (EOS and end-of-turn always cut)")
    p.add_argument("--seed", type=int, default=0)


def _check_combinations(parser: argparse.ArgumentParser, args) -> None:
    """Flag combinations argparse cannot express, refused before any work."""
    if args.command in ("sample", "chat") and args.mesh is not None:
        import jax

        from dlmjax.config import ConfigError
        from dlmjax.sharding import mesh_shape

        n = jax.device_count()
        try:
            mesh_shape(_mesh_config(args.mesh), n)
        except ConfigError as e:
            parser.error(f"argument --mesh: {_mesh_text(args.mesh)}: {e}; give sizes whose product is the device "
                         f"count, e.g. fsdp={n},tensor=1")
    if args.command == "plan":
        if not args.sample:
            given = [flag for flag, value in (("--batch", args.batch), ("--length", args.length),
                                              ("--dtype", args.dtype), ("--cache", args.cache),
                                              ("--guidance", args.guidance), ("--block-length", args.block_length))
                     if value]
            if given:
                parser.error(f"argument {given[0]}: applies to the sampling plan; add --sample")
        if args.mesh is not None and args.devices is not None:
            product = math.prod(args.mesh.values())
            if -1 not in args.mesh.values() and product != args.devices:
                parser.error(f"argument --mesh: {_mesh_text(args.mesh)} needs {product} devices, but --devices is "
                             f"{args.devices}; give one of them, or sizes whose product is {args.devices}")
        if args.mesh is not None and args.devices is None and -1 in args.mesh.values():
            parser.error(f"argument --mesh: {_mesh_text(args.mesh)} has a -1 size; give --devices as well")
    if args.command == "sample":
        if args.chat and args.prompt is None:
            parser.error("argument --chat: it wraps a text --prompt in the chat template; --prompt-ids are sampled "
                         "as they are")
        if args.system is not None and not args.chat:
            parser.error("argument --system: a system message needs --chat")
    if args.command == "eval":
        from dlmjax import cli_eval

        cli_eval.check_flags(parser, args)
    if args.command == "convert":
        if args.from_hf is not None and not args.arch:
            parser.error("argument --arch: dlmjax convert --from-hf needs --arch (llada, dream, mdlm or bd3lm)")
        if args.to_hf is not None and args.arch:
            parser.error("argument --arch: dlmjax convert --to-hf takes no --arch (the checkpoint records it)")
        if args.to_hf is not None and args.mask_id is not None:
            parser.error("argument --mask-id: dlmjax convert --to-hf takes no --mask-id (the checkpoint records it)")


def user_message(command: str, err: BaseException) -> str:
    """One line for a user error: a settings field is named by its flag (`--gen-length`)."""
    from dlmjax.inference import SampleRequest, flag_of

    text = " ".join(str(err).split()) if not isinstance(err, OSError) else _os_message(err)
    field = getattr(err, "field", None)
    if command == "sample" and field in {f.name for f in dataclasses.fields(SampleRequest)}:
        flag = flag_of(field)
        if flag not in text:
            text = f"{flag}: {text}"
    return f"dlmjax {command}: error: {text}"


def _os_message(err: OSError) -> str:
    reason = err.strerror or str(err)
    if err.filename is not None and str(err.filename) not in reason:
        return f"{err.filename}: {reason}"
    return reason


def _is_user_os_error(err: OSError) -> bool:
    """A file the user named that is missing, exists already, or cannot be written (not an internal I/O bug)."""
    return err.filename is not None or isinstance(err, (FileNotFoundError, FileExistsError, PermissionError))


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        _check_combinations(parser, args)
    except SystemExit as e:  # a bad flag (one line already printed), or --help
        return e.code
    if args.command in CHECKPOINT_COMMANDS:
        from dlmjax.hostmem import map_large_allocations

        map_large_allocations()  # freed read / write buffers go back to the OS (dlmjax.hostmem)
    try:
        return args.fn(args)
    except DlmjaxError as e:
        print(user_message(args.command, e), file=sys.stderr)
        return USER_ERROR_STATUS
    except OSError as e:
        if not _is_user_os_error(e):
            raise
        print(user_message(args.command, e), file=sys.stderr)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
