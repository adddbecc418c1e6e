"""The picture of the denoising: the commit step each sampler records inside its jitted loop, and what draws it.

The masked sampler's trace is held against the canvas history (`return_history`, recorded independently after every
forward pass); the block sampler's against its uncached twin's; both against the NFE count.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import dlmjax
from conftest import tiny_model_config
from dlmjax.models.transformer import init_params
from dlmjax.sampling import BlockSamplerSettings, Denoiser, SamplerSettings, generate_masked

CFG = tiny_model_config(vocab_size=64, max_seq_len=64)
MASK = 63
PARAMS = init_params(CFG, jax.random.PRNGKey(0))
PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]


@pytest.mark.parametrize("mode", [dict(), dict(cache="prefix"), dict(cache="dual", threshold=0.3),
                                  dict(factor=1.0), dict(temperature=1.0, remasking="random")], ids=str)
def test_masked_trace_equals_the_history_and_counts_every_slot_once(mode):
    settings = SamplerSettings.llada(gen_length=16, steps=16, block_length=8, mask_id=MASK, **mode)
    prompt = np.asarray([[0, 0, 0, 1, 2], [6, 7, 8, 9, 10]], np.int32)
    prompt_mask = np.asarray([[0, 0, 0, 1, 1], [1] * 5], bool)
    tokens, nfe, history, committed = generate_masked(Denoiser(CFG), PARAMS, prompt, settings, jax.random.PRNGKey(3),
                                                      prompt_mask=prompt_mask, return_history=True, trace=True)
    nfe, history, committed = int(nfe), np.asarray(history)[: int(nfe)], np.asarray(committed)
    for row in range(2):
        first_filled = (history[:, row] != MASK).argmax(axis=0)  # the forward after which each slot is filled
        np.testing.assert_array_equal(committed[row, 5:], first_filled[5:])
        assert (committed[row, :5] == -1).all()  # the prompt is never committed by the sampler
        assert ((committed[row, 5:] >= 0) & (committed[row, 5:] < nfe)).all()  # once, inside the NFE
    used = set(committed[:, 5:].ravel().tolist())
    assert used <= set(range(nfe)) and max(used) <= nfe - 1
    if not mode:  # LLaDA's table, one commit per step and row: every forward pass commits
        assert used == set(range(nfe))


def test_block_trace_counts_every_slot_once_and_orders_it_as_the_uncached_twin():
    settings = BlockSamplerSettings.bd3(max_length=16, block_length=4, mask_id=MASK, steps_per_block=2)
    cached = dlmjax.generate(CFG, PARAMS, PROMPTS, settings, trace=True)
    twin = dlmjax.sampling.generate_blocks_uncached(Denoiser(CFG), PARAMS, np.asarray([[0, 0, 0, 6, 7],
                                                                                      [1, 2, 3, 4, 5]], np.int32),
                                                    settings, jax.random.PRNGKey(0),
                                                    prompt_mask=np.asarray([[0, 0, 0, 1, 1], [1] * 5], bool),
                                                    trace=True)
    for steps, prompt in zip(cached.commit_steps(), PROMPTS):
        assert all(t == -1 for t in steps[:len(prompt)])
        assert all(0 <= t < cached.nfe for t in steps[len(prompt):])
    # The twin runs rows in the other order here: row 0 of the cached batch is row 1 of the twin's.
    twin_steps = np.asarray(twin[2])
    for mine, theirs, prompt in ((cached.commit_steps()[0], twin_steps[1], PROMPTS[0]),
                                 (cached.commit_steps()[1], twin_steps[0], PROMPTS[1])):
        n = len(prompt)
        # Same commits in the same order (the cached NFE also counts prefill and commit passes).
        assert np.argsort(mine[n:], kind="stable").tolist() == np.argsort(theirs[n:], kind="stable").tolist()
    with pytest.raises(ValueError, match="trace=True"):
        dlmjax.generate(CFG, PARAMS, PROMPTS, settings).commit_steps()


def test_cli_trace_draws_the_commit_order_and_prints_each_block(tmp_path, capsys):
    from dlmjax.checkpoint import save_params
    from dlmjax.cli import main
    from dlmjax.config import load_config

    cfg = dataclasses.replace(load_config(None, ["diffusion.mask_id=63", "data.seq_len=32"]), model=CFG)
    export = save_params(tmp_path / "run", cfg, PARAMS)
    picture = tmp_path / "order.png"
    argv = ["sample", "--checkpoint", str(export), "--prompt-ids", "1,2,3", "--gen-length", "8", "--steps", "8",
            "--block-length", "4", "--trace", str(picture), "--trace-text", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 5000
    lines = [line for line in captured.err.splitlines() if line.startswith("block ")]
    assert [line.split(":")[0] for line in lines] == ["block 0 row 0", "block 1 row 0"]
    assert lines[0].split(": ")[1].split().count("_") == 4  # after block 0 the second block is still masked
    assert json.loads(captured.out)["nfe"] == 8
    before = picture.read_bytes()
    assert main(argv) == 2  # never overwrites the user's file
    assert "exists" in capsys.readouterr().err and picture.read_bytes() == before
