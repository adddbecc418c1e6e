"""The `dlmjax` command line: train, plan, pack, sample, eval, convert, forward.

    dlmjax train --config configs/demo.yaml [--workdir DIR] [section.key=value ...]
    dlmjax plan --config configs/llada_8b.yaml [--devices 256] [--platform tpu|gpu|cpu] [section.key=value ...]
    dlmjax sample --checkpoint DIR --prompt TEXT [--gen-length N --steps S ...]
    dlmjax pack --config C --out STORE [section.key=value ...]     (then train with data.kind=packed data.path=STORE)
    dlmjax eval --checkpoint DIR [section.key=value ...]
    dlmjax convert --from-hf HF_DIR --arch llada|dream|mdlm|bd3lm --out CKPT
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
import sys
from pathlib import Path

from dlmjax.errors import DlmjaxError

USER_ERROR_STATUS = 2


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
    from dlmjax.config import load_config
    from dlmjax.train.plan import format_plan, make_plan

    cfg = load_config(args.config, args.overrides)
    hbm = None if args.hbm_gib is None else int(args.hbm_gib * 2 ** 30)
    print(format_plan(make_plan(cfg, args.devices, args.platform, hbm), cfg, args.platform))
    return 0


def cmd_pack(args) -> int:
    from dlmjax.config import load_config
    from dlmjax.data.store import pack_corpus

    summary = pack_corpus(load_config(args.config, args.overrides), args.out, rows_per_file=args.rows_per_file)
    print(json.dumps(summary))
    _log(f"train from it with: data.kind=packed data.path={args.out}")
    return 0


def cmd_eval(args) -> int:
    from dlmjax.evaluate import evaluate_checkpoint
    from dlmjax.train.result import print_json

    print_json(evaluate_checkpoint(args.checkpoint, args.overrides, show_examples=args.show, log=_log))
    return 0


def cmd_sample(args) -> int:
    from dlmjax.inference import SampleRequest, open_run, sample_rows

    run = open_run(args.checkpoint)
    rows = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else [run.encode(args.prompt)]
    request = SampleRequest(
        gen_length=args.gen_length, steps=args.steps, block_length=args.block_length,
        steps_per_block=args.steps_per_block, remasking=args.remasking, temperature=args.temperature,
        cfg_scale=args.cfg_scale, cache=args.cache, threshold=args.threshold, factor=args.factor, alg=args.alg,
        alg_temp=args.alg_temp, top_p=args.top_p, top_k=args.top_k, stop_at_eos=args.stop_at_eos or None)
    out, nfe = sample_rows(run, rows, request, seed=args.seed)
    if args.json:
        print(json.dumps({"tokens": out, "nfe": nfe}))
    elif args.prompt is not None:
        print(run.decode(out[0][len(rows[0]):]))
    else:
        for row in out:
            print(row)
    return 0


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
        out = convert_from_hf(args.from_hf, args.arch, args.out)
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


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (no usage block) with status 2, like every other user error."""

    def error(self, message):  # noqa: D102
        self.exit(USER_ERROR_STATUS, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from dlmjax.sampling.choices import CacheKind, Confidence, DreamAlg

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
    pl.add_argument("--config", required=True, help="YAML file under configs/")
    pl.add_argument("--devices", type=positive, default=8, help="number of devices of the mesh (default 8)")
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
    prompt.add_argument("--prompt", help="text prompt, encoded with the run's own tokenizer (BOS first)")
    prompt.add_argument("--prompt-ids", help="token ids: 1,2,3 or rows 1,2,3;4,5,6")
    s.add_argument("--gen-length", type=positive, help="generated slots (default: the rest of a training row)")
    s.add_argument("--steps", type=positive, help="masked sampler: denoising steps over all blocks")
    s.add_argument("--block-length", type=positive,
                   help="masked sampler: semi-AR block; block sampler (bd3 runs): block size (default: trained)")
    s.add_argument("--steps-per-block", type=positive, help="block sampler: denoising steps per block")
    s.add_argument("--remasking", choices=[str(c) for c in Confidence])
    s.add_argument("--temperature", type=_real(0.0, what="a number >= 0 (0 is greedy)"))
    s.add_argument("--cfg-scale", type=_real(0.0, what="a number >= 0 (0 is off)"),
                   help="classifier-free guidance weight (masked sampler)")
    s.add_argument("--cache", choices=[str(c) for c in CacheKind],
                   help="masked sampler: Fast-dLLM KV cache (default none)")
    s.add_argument("--threshold", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1]"),
                   help="parallel decoding: commit slots with confidence >= X (Fast-dLLM; with --alg "
                   "confidence_threshold, Dream's rule)")
    s.add_argument("--factor", type=_real(0.0, low_open=True, what="a number > 0"),
                   help="parallel decoding: Fast-dLLM's factor rule")
    s.add_argument("--alg", choices=[str(a) for a in DreamAlg],
                   help="Dream's diffusion_generate algorithm (one block over the generation by default)")
    s.add_argument("--alg-temp", type=_real(0.0, what="a number >= 0"),
                   help="Dream: sample committed slots (alg temperature)")
    s.add_argument("--top-p", type=_real(0.0, 1.0, low_open=True, what="a number in (0, 1] (1 is off)"),
                   help="nucleus filtering of each proposal")
    s.add_argument("--top-k", type=_int_at_least(0), help="top-k filtering of each proposal (0 is off)")
    s.add_argument("--stop-at-eos", action="store_true", help="masked sampler: a row stops after the block "
                   "in which it generated EOS (later slots hold the pad id)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help='print {"tokens": [[...]], "nfe": N}: prompt + generation '
                   "per row")
    s.set_defaults(fn=cmd_sample)

    e = sub.add_parser("eval", help="held-out NELBO perplexity and task exact match; prints one JSON line")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--show", type=_int_at_least(0), default=5, help="print this many sampled problems")
    e.add_argument("overrides", nargs="*", help="section.key=value (e.g. sample.steps=2)")
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("convert", help="import a Hugging Face checkpoint folder, or export one")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="config.json + model.safetensors (or shards + index)")
    way.add_argument("--to-hf", metavar="CKPT", help="a dlmjax checkpoint (from convert --from-hf, or llada/dream)")
    # No argparse `choices`: the interchange checks the value and names what is allowed in its own words.
    c.add_argument("--arch", help="with --from-hf (required there): the architecture of the folder: llada, dream, "
                   "mdlm or bd3lm")
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


def _check_combinations(parser: argparse.ArgumentParser, args) -> None:
    """Flag combinations argparse cannot express, refused before any work."""
    if args.command == "convert":
        if args.from_hf is not None and not args.arch:
            parser.error("argument --arch: dlmjax convert --from-hf needs --arch (llada, dream, mdlm or bd3lm)")
        if args.to_hf is not None and args.arch:
            parser.error("argument --arch: dlmjax convert --to-hf takes no --arch (the checkpoint records it)")


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
