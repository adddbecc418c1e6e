"""Spread of LLaDA's Monte Carlo log-likelihood against `mc_num`, on a trained addition run, beside its exact value.

    .venv/bin/python bench/loglik_variance.py --checkpoint runs/demo [--problems 16] [--seeds 16]
        [--mc-nums 1,4,16,64,128] [--out FILE.json]

For `--problems` held-out problems of the run's task, the request is (BOS + prompt, answer) as the run's rows frame
them (the shipped `dlmjax_addition_mc` task scores the same pairs). Each is estimated with `--seeds` different
seeds at each `mc_num` (batch size `min(mc_num, 32)`, the stratified rounds of LLaDA's `eval_llada.py`). The exact
expectation and standard deviation of the estimator come from enumerating every masked subset of the answer
(2^La - 1 forwards) with the rows' mask-count table (`exact_moments`). Reports per `mc_num`: the standard deviation
across seeds beside the exact one (means over problems, nats), the largest distance of a problem's mean over seeds
from its exact expectation in exact standard errors (a few at most if the estimator is right), and requests per
second. Prints one JSON object and a markdown table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def subset_scores(denoiser, params, prompt, answer, mask_id):
    """{n: float64[C(La, n)]}: a row's score La / n x summed -log p over the masked set, for every n-subset."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    la = len(answer)
    rows, subsets = [], []
    for n in range(1, la + 1):
        for s in itertools.combinations(range(la), n):
            row = list(prompt) + list(answer)
            for j in s:
                row[len(prompt) + j] = mask_id
            rows.append(row)
            subsets.append(s)
    logp = np.asarray(jax.nn.log_softmax(denoiser(params, jnp.asarray(rows, jnp.int32)).astype(jnp.float32), -1),
                      np.float64)
    scores: dict[int, list[float]] = {}
    for r, s in enumerate(subsets):
        scores.setdefault(len(s), []).append(la / len(s) * -sum(logp[r, len(prompt) + j, answer[j]] for j in s))
    return {n: np.asarray(v) for n, v in scores.items()}


def exact_moments(scores, la, mc_num, batch_size):
    """(expectation, standard deviation) of the estimate, exactly.

    A round draws k, then each row i an independent uniform n_i(k)-subset: its mean over rows has conditional mean
    mu(k) = mean_i m(n_i) and variance sum_i v(n_i) / b^2 (m, v: mean and variance of a row score over the
    n-subsets); rounds are independent, so Var = (Var_k mu(k) + E_k[sum_i v(n_i) / b^2]) / rounds.
    """
    import numpy as np

    from dlmjax.likelihood import masked_counts

    means, within = [], []
    for k in range(1, la + 1):
        counts = [int(n) for n in masked_counts(k, la, batch_size)]
        means.append(np.mean([scores[n].mean() for n in counts]))
        within.append(sum(scores[n].var() for n in counts) / batch_size ** 2)
    var_round = np.var(means) + np.mean(within)
    return -float(np.mean(means)), float(np.sqrt(var_round / (mc_num // batch_size)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--mc-nums", default="1,4,16,64,128")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jax
    import numpy as np

    from dlmjax.data.tasks import get_task, heldout
    from dlmjax.evaluate import log_likelihoods
    from dlmjax.inference import open_run
    from dlmjax.sampling import Denoiser

    run = open_run(args.checkpoint)
    cfg = run.config
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    problems = heldout(task, args.problems, cfg.data.seed)
    requests = []
    for p in problems:  # lm-eval's split: the answer is what encoding prompt + answer adds
        prompt = run.encode(p.prompt)
        requests.append((prompt, run.encode(p.prompt + p.answer)[len(prompt):]))
    denoiser = Denoiser(cfg.model)
    mask_id = run.tokens.mask_id
    scores = [subset_scores(denoiser, run.params, p, a, mask_id) for p, a in requests]

    rows = []
    for mc_num in [int(m) for m in args.mc_nums.split(",")]:
        batch_size = min(mc_num, 32)
        moments = np.array([exact_moments(sc, len(a), mc_num, batch_size) for sc, (_, a) in zip(scores, requests)])
        exact, exact_std = moments[:, 0], moments[:, 1]
        log_likelihoods(cfg, run.params, requests, mc_num=mc_num, batch_size=batch_size,
                        rng=jax.random.PRNGKey(0))  # compile
        t0 = time.perf_counter()
        draws = np.stack([log_likelihoods(cfg, run.params, requests, mc_num=mc_num, batch_size=batch_size,
                                          rng=jax.random.PRNGKey(1 + s)) for s in range(args.seeds)])
        seconds = time.perf_counter() - t0
        std = draws.std(axis=0, ddof=1)
        # How far the mean over seeds is from the exact expectation, in units of its exact standard error.
        z = np.abs(draws.mean(axis=0) - exact) / np.maximum(exact_std / np.sqrt(args.seeds), 1e-12)
        rows.append({"mc_num": mc_num, "batch_size": batch_size, "std_nats": round(float(std.mean()), 4),
                     "exact_std_nats": round(float(exact_std.mean()), 4),
                     "max_exact_std_nats": round(float(exact_std.max()), 4),
                     "max_z": round(float(z.max()), 2),
                     "requests_per_s": round(len(requests) * args.seeds / seconds, 1)})
    result = {"checkpoint": args.checkpoint, "task": cfg.data.task, "problems": len(requests),
              "answer_tokens": len(requests[0][1]), "seeds": args.seeds,
              "exact_mean_loglik": round(float(np.mean([exact_moments(sc, len(a), 1, 1)[0]
                                                         for sc, (_, a) in zip(scores, requests)])), 4),
              "rows": rows, "load_avg": os.getloadavg()[0]}
    print(json.dumps(result))
    print("\n| mc_num | batch | std across seeds (nats) | exact std | largest exact std | max |mean - exact| / stderr "
          "| requests/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mc_num']} | {r['batch_size']} | {r['std_nats']} | {r['exact_std_nats']} | "
              f"{r['max_exact_std_nats']} | {r['max_z']} | {r['requests_per_s']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
