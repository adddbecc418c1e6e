"""The front door picks the block-diffusion sampler a request asks for: the exact-cache block sampler with fused
commits by default, Fast-dLLM v2's sub-block rule with `--sub-block-length`, D2F's pipelined sampler with
`--window-blocks`; each gives exactly what calling that sampler directly gives."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_front_door import export_run

from dlmjax.cli import main
from dlmjax.inference import SampleRequest, open_run, sample_rows
from dlmjax.sampling import (BlockSamplerSettings, Denoiser, PipelineSettings, generate_blocks, generate_pipelined)
from dlmjax.sampling.rules import SubBlocks, Threshold


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    export, _ = export_run(tmp_path_factory.mktemp("samplers") / "bd3", "bd3")
    return open_run(export)


PROMPT = [1, 5, 6, 7, 8, 2]


def _direct(run, settings, fn, width=15):
    """`fn` called directly on PROMPT left-padded to `width` (the front door's bucket for it: 16, capped at
    max_length - 1)."""
    pad = width - len(PROMPT)
    prompt = np.asarray([[0] * pad + PROMPT], np.int32)
    prompt_mask = np.asarray([[False] * pad + [True] * len(PROMPT)])
    tokens, nfe = fn(Denoiser(run.config.model), run.params, prompt, settings, jax.random.PRNGKey(0),
                     prompt_mask=prompt_mask)
    return np.asarray(tokens)[0].tolist(), int(nfe)


def test_default_is_the_fused_block_sampler(run):
    settings = run.settings(len(PROMPT), SampleRequest(gen_length=10))
    assert isinstance(settings, BlockSamplerSettings) and settings.fuse_commits
    rows, nfe = sample_rows(run, [PROMPT], SampleRequest(gen_length=10))
    unfused = BlockSamplerSettings.bd3(max_length=16, block_length=4, tokens=settings.tokens)
    tokens, unfused_nfe = _direct(run, unfused, generate_blocks)
    assert rows[0] == tokens and nfe < unfused_nfe  # the same tokens, fewer forwards


def test_sub_block_length_selects_v2_decoding(run):
    request = SampleRequest(gen_length=10, sub_block_length=2, threshold=0.5)
    settings = run.settings(len(PROMPT), request)
    assert settings.rule == SubBlocks(2, Threshold(0.5)) and settings.fuse_commits
    rows, nfe = sample_rows(run, [PROMPT], request)
    assert (rows[0], nfe) == _direct(run, settings, generate_blocks)


def test_window_blocks_selects_the_pipelined_sampler_with_threshold_as_its_skip_threshold(run):
    request = SampleRequest(gen_length=10, window_blocks=3, threshold=0.6, block_add_threshold=0.25)
    settings = run.settings(len(PROMPT), request)
    assert isinstance(settings, PipelineSettings)
    assert (settings.window_blocks, settings.skip_threshold, settings.block_add_threshold,
            settings.decoded_token_threshold) == (3, 0.6, 0.25, 0.5)
    rows, nfe = sample_rows(run, [PROMPT], request)
    assert (rows[0], nfe) == _direct(run, settings, generate_pipelined)


def test_the_cli_samples_with_the_pipelined_sampler(run, capsys):
    argv = ["sample", "--checkpoint", str(run.path), "--prompt-ids", ",".join(map(str, PROMPT)), "--gen-length",
            "10", "--window-blocks", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    settings = run.settings(len(PROMPT), SampleRequest(gen_length=10, window_blocks=2))
    assert out["tokens"][0] == _direct(run, settings, generate_pipelined)[0]  # prompt + generation
