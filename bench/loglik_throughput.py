"""Log-likelihood throughput: `dlmjax.likelihood.log_likelihoods` (rows of `group` requests per forward, the
rounds in one jitted scan) against a plain Python loop that does per request what LLaDA's `eval_llada.py` does,
on the 27.8M LLaDA-architecture model of bench/sample.py (d_model 512, 8 heads, 8 layers, SwiGLU 1536, vocab 512,
random weights).

    .venv/bin/python bench/loglik_throughput.py [--requests 16] [--prompt-len 40] [--max-answer 8]
        [--mc-num 128] [--batch-size 32] [--groups 4] [--repeats 3] [--quick] [--json-out F]
        [--d-model 512 --layers 8 --heads 8 --mlp-hidden 1536]   # another model shape (random weights)

The loop, per request and per round: draw k, build the round's `batch_size` masked rows on the host with numpy
(stratified counts as LLaDA's linspace, a random permutation per row), one jitted forward + loss of the unpadded
[batch_size, prompt + answer] rows, one host sync for the round's loss (LLaDA's `.item()`). Both are timed after
compilation (every shape compiled once beforehand), on the same requests, median of `--repeats`.

Floor: the loop's forwards alone (a bare jitted forward of each request's [batch_size, length] rows, times its
rounds), what any per-request loop of this model costs at least.

Agreement: the two draw their masks differently, so each request's two estimates are compared in units of their
standard errors (from the spread of the per-round losses: rounds are independent draws, the rows within a round
are not); a one-token answer has a single possible mask, so both must give the same number to float32 tolerance.
With 4 rounds a standard error is itself a rough estimate (a few of 14 requests past 3 happens by chance), so the
request furthest apart is scored again both ways with `--recheck-rounds` rounds and that z is reported too.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from sample import reference_model  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dlmjax.likelihood import log_likelihoods, masked_counts, row_losses  # noqa: E402
from dlmjax.models.transformer import count_params, init_params  # noqa: E402
from dlmjax.sampling import Denoiser  # noqa: E402
from dlmjax.sampling.api import bucket_width  # noqa: E402

MASK_ID = 500  # as bench/sample.py: ids 0..499 are text, the vocabulary has 512
BUCKET = 16


def make_requests(n: int, prompt_len: int, max_answer: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """`n` random (prompt, answer) pairs: prompts of prompt_len +- 4 tokens, answers of 1..max_answer tokens
    (cycling, so every answer length occurs)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lp = int(prompt_len + rng.integers(-4, 5)) if prompt_len > 8 else prompt_len
        la = 1 + i % max_answer
        out.append((rng.integers(0, MASK_ID, lp).tolist(), rng.integers(0, MASK_ID, la).tolist()))
    return out


def make_round_loss(denoiser):
    @jax.jit
    def round_loss(params, noisy, clean, masked, ratio):
        """LLaDA's per-round loss: sum over masked slots of CE / (n / La), over batch_size rows. [b, L] inputs."""
        logits = denoiser(params, noisy).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        ce = -jnp.take_along_axis(logp, clean[..., None], axis=-1)[..., 0]
        return jnp.where(masked, ce / ratio[:, None], 0.0).sum() / noisy.shape[0]

    return round_loss


def loop_estimate(round_loss, params, prompt, answer, mc_num: int, batch_size: int,
                  rng: np.random.Generator) -> tuple[float, np.ndarray]:
    """One request the way eval_llada.py scores it: (estimate, float64[rounds] per-round losses)."""
    lp, la = len(prompt), len(answer)
    clean = np.tile(np.asarray(prompt + answer, np.int32), (batch_size, 1))
    losses = []
    for _ in range(mc_num // batch_size):
        k = int(rng.integers(1, la + 1))
        n = masked_counts(k, la, batch_size)
        sorted_mask = np.arange(la)[None] < n[:, None]
        answer_mask = np.stack([row[rng.permutation(la)] for row in sorted_mask])
        masked = np.concatenate([np.zeros((batch_size, lp), bool), answer_mask], axis=1)
        noisy = np.where(masked, MASK_ID, clean).astype(np.int32)
        ratio = (n / la).astype(np.float32)
        losses.append(float(round_loss(params, noisy, clean, masked, ratio)))  # the per-round host sync
    losses = np.asarray(losses, np.float64)
    return -losses.mean(), losses


def run_loop(round_loss, params, requests, mc_num, batch_size, seed=0):
    rng = np.random.default_rng(seed)
    results = [loop_estimate(round_loss, params, p, a, mc_num, batch_size, rng) for p, a in requests]
    return np.array([e for e, _ in results]), np.stack([r for _, r in results])


def timed(fn, repeats: int, label: str):
    times, out = [], None
    for _ in tqdm(range(repeats), desc=label, leave=False, file=sys.stderr):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def z_score(a: float, b: float, rounds_a: np.ndarray, rounds_b: np.ndarray) -> float:
    """|a - b| in standard errors of the difference (each from its per-round losses)."""
    se = np.sqrt(rounds_a.var(ddof=1) / len(rounds_a) + rounds_b.var(ddof=1) / len(rounds_b))
    return float(abs(a - b) / se)


def agreement(requests, est_a, rounds_a, est_b, rounds_b) -> dict:
    """Per request |a - b| in standard errors (answers > 1 token) or relative difference (1-token answers)."""
    z, one_token = {}, []
    for i, ((_, ans), a, b, ra, rb) in enumerate(zip(requests, est_a, est_b, rounds_a, rounds_b)):
        if len(ans) == 1:
            one_token.append(abs(a - b) / abs(b))
        else:
            z[i] = z_score(a, b, ra, rb)
    worst = max(z, key=z.get) if z else None
    return {"max_abs_z": round(z[worst], 2) if z else None, "worst_request": worst,
            "n_z_over_3": int(sum(x > 3 for x in z.values())), "n_compared": len(z),
            "one_token_max_rel_diff": float(max(one_token)) if one_token else None}


def recheck(denoiser, round_loss, params, request, rounds: int, batch_size: int) -> float:
    """The z of one request scored again both ways with `rounds` rounds each (fresh draws)."""
    mc = rounds * batch_size
    loop_est, loop_rounds = run_loop(round_loss, params, [request], mc, batch_size, seed=7)
    rows = row_losses(denoiser, params, [request], mask_id=MASK_ID, mc_num=mc, batch_size=batch_size,
                      rng=jax.random.PRNGKey(7), bucket=BUCKET, group=1)
    per_round = rows[0].mean(axis=1, dtype=np.float32).astype(np.float64)
    return z_score(loop_est[0], -per_round.mean(), loop_rounds[0], per_round)


def forward_floor(denoiser, params, requests, rounds: int, batch_size: int) -> float:
    """Seconds of the loop's forwards alone: per request, `rounds` bare forwards of its [batch_size, L] rows."""
    forward = jax.jit(lambda p, x: denoiser(p, x))
    per_length = {}
    for length in sorted({len(p) + len(a) for p, a in requests}):
        x = jnp.full((batch_size, length), MASK_ID, jnp.int32)
        jax.block_until_ready(forward(params, x))
        per_length[length] = timed(lambda: forward(params, x), 3, f"bare forward [{batch_size}, {length}]")[0]
    return sum(rounds * per_length[len(p) + len(a)] for p, a in requests)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=40)
    ap.add_argument("--max-answer", type=int, default=8)
    ap.add_argument("--mc-num", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--groups", default="4", help="comma-separated requests per call of log_likelihoods")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--recheck-rounds", type=int, default=32, help="rounds of the recheck when max z > 3")
    ap.add_argument("--quick", action="store_true", help="4 requests, mc_num 64, one repeat (< 1 minute)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--mlp-hidden", type=int, default=1536)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.mc_num, args.repeats, args.recheck_rounds = 4, 64, 1, 8
    groups = [int(g) for g in args.groups.split(",")]
    requests = make_requests(args.requests, args.prompt_len, args.max_answer)
    longest = max(len(p) + len(a) for p, a in requests)
    cfg = dataclasses.replace(reference_model(bucket_width(longest, BUCKET)), d_model=args.d_model,
                              n_layers=args.layers, n_heads=args.heads, mlp_hidden=args.mlp_hidden)
    params = init_params(cfg, jax.random.PRNGKey(0))
    denoiser = Denoiser(cfg)
    mc, b = args.mc_num, args.batch_size
    load = os.getloadavg()[0]

    # The loop: compile every [b, length] shape once, then time whole passes over the requests.
    round_loss = make_round_loss(denoiser)
    t0 = time.perf_counter()
    for length in sorted({len(p) + len(a) for p, a in requests}):
        z = np.zeros((b, length), np.int32)
        jax.block_until_ready(round_loss(params, z, z, z.astype(bool), np.ones(b, np.float32)))
    loop_compile = time.perf_counter() - t0
    loop_s, loop_times, (loop_est, loop_rounds) = timed(
        lambda: run_loop(round_loss, params, requests, mc, b), args.repeats, "loop")
    floor_s = forward_floor(denoiser, params, requests, mc // b, b)

    rows = []
    for group in groups:
        rng = jax.random.PRNGKey(1)
        t0 = time.perf_counter()
        # First call: compiles each width bucket, and its rows give the standard errors.
        batched_rows = row_losses(denoiser, params, requests, mask_id=MASK_ID, mc_num=mc, batch_size=b, rng=rng,
                                  bucket=BUCKET, group=group)
        first_call = time.perf_counter() - t0
        seconds, times, est = timed(lambda: log_likelihoods(denoiser, params, requests, mask_id=MASK_ID, mc_num=mc,
                                                            batch_size=b, rng=rng, bucket=BUCKET, group=group),
                                    args.repeats, f"group {group}")
        rounds = batched_rows.mean(axis=2, dtype=np.float32).astype(np.float64)  # [R, rounds] per-round losses
        assert np.array_equal(est, -rounds.mean(axis=1)), "log_likelihoods != its own row_losses"
        rows.append({"group": group, "seconds": round(seconds, 3), "all_seconds": [round(t, 3) for t in times],
                     "requests_per_s": round(len(requests) / seconds, 3),
                     "speedup_vs_loop": round(loop_s / seconds, 2), "first_call_s": round(first_call, 1),
                     "agreement": agreement(requests, est, rounds, loop_est, loop_rounds)})
    # Every group gives the same estimates (request j draws from fold_in(rng, j)), so one recheck serves all.
    worst = rows[0]["agreement"]
    recheck_z = None
    if worst["max_abs_z"] is not None and worst["max_abs_z"] > 3:
        recheck_z = round(recheck(denoiser, round_loss, params, requests[worst["worst_request"]],
                                  args.recheck_rounds, b), 2)

    tokens = sum(len(p) + len(a) for p, a in requests)
    summary = {"bench": "loglik_throughput", "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
               "jax": jax.__version__, "n_params": count_params(params), "requests": len(requests),
               "prompt_tokens_mean": round(float(np.mean([len(p) for p, _ in requests])), 1),
               "answer_tokens": sorted({len(a) for _, a in requests}), "mc_num": mc, "batch_size": b,
               "rows_per_request": mc, "tokens_per_request_mean": round(tokens / len(requests), 1),
               "repeats": args.repeats, "load_avg_1min_start": round(load, 2),
               "load_avg_1min_end": round(os.getloadavg()[0], 2),
               "loop": {"seconds": round(loop_s, 3), "all_seconds": [round(t, 3) for t in loop_times],
                        "requests_per_s": round(len(requests) / loop_s, 3), "compile_s": round(loop_compile, 1)},
               "forward_floor_s": round(floor_s, 3), "batched": rows,
               "recheck": recheck_z and {"request": worst["worst_request"], "rounds": args.recheck_rounds,
                                         "abs_z": recheck_z}}
    print(json.dumps(summary))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(summary, f, indent=1)
    print(f"\n{len(requests)} requests (prompts ~{summary['prompt_tokens_mean']} tokens, answers "
          f"{min(summary['answer_tokens'])}-{max(summary['answer_tokens'])}), mc_num {mc}, batch_size {b}, "
          f"{count_params(params) / 1e6:.1f}M params, load {summary['load_avg_1min_start']} -> "
          f"{summary['load_avg_1min_end']}\n")
    print("| method | group | seconds | requests/s | x loop | max abs z | z > 3 | 1-token max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| Python loop (eval_llada.py) | 1 | {loop_s:.2f} | {len(requests) / loop_s:.3f} | 1.00 | | | |")
    print(f"| (the loop's forwards alone) | 1 | {floor_s:.2f} | {len(requests) / floor_s:.3f} | "
          f"{loop_s / floor_s:.2f} | | | |")
    for r in rows:
        a = r["agreement"]
        rel = "-" if a["one_token_max_rel_diff"] is None else f"{a['one_token_max_rel_diff']:.1e}"
        print(f"| `log_likelihoods` | {r['group']} | {r['seconds']:.2f} | {r['requests_per_s']:.3f} | "
              f"{r['speedup_vs_loop']:.2f} | {a['max_abs_z']} | {a['n_z_over_3']} / {a['n_compared']} | {rel} |")
    if recheck_z is not None:
        print(f"\nrequest {worst['worst_request']} (max z) scored again with {args.recheck_rounds} rounds each way: "
              f"z = {recheck_z}")


if __name__ == "__main__":
    main()
