#!/usr/bin/env bash
# The demo: install, train a small masked-diffusion LM on 3-digit addition (CPU, a few minutes),
# report held-out exact match of the jitted sampler, then sample one problem from the checkpoint.
# Rerunning resumes the run in runs/demo (delete that folder to start over). Extra arguments are
# config overrides, e.g. `bash launch/demo.sh train.seed=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
WORKDIR=${WORKDIR:-runs/demo}
.venv/bin/dlmjax train --config configs/demo.yaml --workdir "$WORKDIR" "$@"
echo "sampling 123+456= from the checkpoint:"
.venv/bin/dlmjax sample --checkpoint "$WORKDIR" --prompt "123+456="
