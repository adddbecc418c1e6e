"""The example notebook runs top to bottom (its cells assert their own results)."""
from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generate_notebook_runs(capsys):
    notebook = json.loads((ROOT / "examples" / "generate.ipynb").read_text())
    cells = [c for c in notebook["cells"] if c["cell_type"] == "code"]
    assert len(cells) >= 5
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for i, cell in enumerate(cells):
            exec(compile("".join(cell["source"]), f"generate.ipynb[code cell {i}]", "exec"), namespace)
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert "llada" in printed and "NFE" in printed and "generated tokens/s" in printed
    # The notebook's LLaDA call is golden case p0/llada_generate_low_confidence.
    golden = json.loads((ROOT / "tests" / "golden" / "tiny_llada" / "golden.json").read_text())["cases"][0]
    assert namespace["out"].rows() == golden["output_ids"] and namespace["out"].nfe == golden["nfe"]
    assert namespace["out_fast"].nfe < namespace["out"].nfe
