"""A picture of the denoising: when each slot was committed, drawn or printed.

`dlmjax sample --trace order.png` draws, for each sampled row, a slot x forward-pass chart: one mark per generated
slot at the forward pass after which the sampler committed it (`Generation.commit_steps()`, recorded inside the
jitted loop), the prompt shaded, block edges as vertical lines. Left-to-right decoding is a staircase, parallel
decoding puts many slots on one pass, random order is a cloud. `--trace-text` prints each row's canvas after every
finished block, still-masked slots as `_`. matplotlib is the `plot` extra (`pip install dlmjax[plot]`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from dlmjax.errors import InputError

MASKED = "_"


def draw_commit_order(path: str | Path, commit_steps: Sequence[Sequence[int]], prompt_lengths: Sequence[int],
                      block_edges: Sequence[Sequence[int]], *, nfe: int, title: str = "") -> Path:
    """Writes the chart to `path` (PNG, or any format matplotlib knows from the suffix) and returns it.

    Args:
      commit_steps: per row, per slot of prompt + generation: the forward pass that committed it, -1 if none.
      prompt_lengths: per row, the prompt's slots (shaded).
      block_edges: per row, the slot indices where a block starts or ends (vertical lines).
      nfe: forward passes the sampler ran (the y range).
    """
    try:
        import matplotlib  # noqa: PLC0415 (an optional extra)
    except ModuleNotFoundError:
        raise InputError("--trace draws with matplotlib, which is not installed: pip install 'dlmjax[plot]' "
                         "(or use --trace-text)") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = len(commit_steps)
    width = max(len(r) for r in commit_steps)
    fig, axes = plt.subplots(rows, 1, figsize=(min(4 + width / 8, 24), 1.2 + 2.2 * rows), squeeze=False,
                             sharex=True)
    for i, (ax, steps) in enumerate(zip(axes[:, 0], commit_steps)):
        slots = [q for q, t in enumerate(steps) if t >= 0]
        ax.axvspan(-0.5, prompt_lengths[i] - 0.5, color="0.88", lw=0, label="prompt")
        for edge in block_edges[i]:
            ax.axvline(edge - 0.5, color="tab:gray", lw=0.8, ls="--")
        ax.scatter(slots, [steps[q] for q in slots], s=max(4, 900 / width), marker="s", color="tab:blue",
                   label="committed")
        ax.set_ylim(nfe - 0.5, -0.5)  # pass 0 at the top: time runs down
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylabel(f"row {i}\nforward pass")
    axes[-1, 0].set_xlabel("slot (prompt, then generation); dashed: block edges")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    fig.suptitle(title or f"commit order: {nfe} forward passes")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def canvas_text(decode: Callable[[list[int]], str], ids: Sequence[int], mask_id: int) -> str:
    """A canvas as text: runs of committed ids decoded, each still-masked slot shown as `_`."""
    out, run = [], []
    for t in ids:
        if t == mask_id:
            if run:
                out.append(decode(run))
                run = []
            out.append(MASKED)
        else:
            run.append(int(t))
    if run:
        out.append(decode(run))
    return "".join(out)


__all__ = ["canvas_text", "draw_commit_order"]
