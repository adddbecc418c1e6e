#!/usr/bin/env bash
# Train on a Cloud TPU VM or multi-host slice: create (or reuse) it, put this repository on every worker,
# install `dlmjax[tpu]`, and run the same `dlmjax train` on all workers, streaming their output here.
#
# usage: launch/tpu_vm.sh --name NAME --zone ZONE [--accelerator-type TYPE] [--version IMAGE] [--project ID]
#                         [--spot] [--config CONFIG] [--workdir DIR|gs://BUCKET/PATH] [--repo URL [--ref REF]]
#                         [--skip-create] [--skip-install] [--dry-run] [-- overrides...]
#
#   --name, --zone         TPU VM name and zone (env TPU_NAME, TPU_ZONE; required)
#   --accelerator-type     e.g. v4-8 (one host), v4-32 or v5litepod-16 (several hosts); used only when creating
#                          (env ACCELERATOR_TYPE, default v4-8)
#   --version              TPU VM image (env TPU_VERSION, default tpu-ubuntu2204-base)
#   --project              gcloud project (env PROJECT; default: gcloud's configured project)
#   --spot                 create a Spot VM (preemptible; rerun this script to resume from the last checkpoint)
#   --config               config file, relative to the repository (env CONFIG, default configs/demo.yaml)
#   --workdir              run directory (env WORKDIR, default runs/<config name>). A multi-host slice needs a
#                          directory every worker sees, because every process writes its shards of the checkpoint:
#                          pass gs://BUCKET/PATH and the bucket is mounted with gcsfuse at /tmp/gcs/BUCKET on
#                          every worker. A local path is fine on a single-host VM.
#   --repo, --ref          git clone URL and commit/branch (env REPO_URL, REPO_REF=main); without --repo the
#                          local working tree (tracked and untracked files, minus .git/.venv/runs) is copied
#   --skip-create          fail instead of creating the VM when it does not exist
#   --skip-install         reuse the code and .venv already on the workers
#   --dry-run              print the gcloud commands instead of running them (no gcloud needed)
#   after --                config overrides for `dlmjax train`, e.g. train.steps=20000 data.batch_size=256
#
# JAX on each worker finds the slice by itself (dlmjax.distributed: jax.distributed.initialize() on a TPU VM);
# set DLMJAX_DISTRIBUTED=0 in the remote environment to opt out. Worker 0 logs; `dlmjax train` exits 143
# after a preemption (SIGTERM): rerun the same command and the run resumes from its last checkpoint.
#
# example: launch/tpu_vm.sh --name dlm-v4 --zone us-central2-b --accelerator-type v4-32 \
#            --config configs/text.yaml --workdir gs://my-bucket/runs/text -- train.steps=20000
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-8}
VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
PROJECT=${PROJECT:-}
SPOT=0
CONFIG=${CONFIG:-configs/demo.yaml}
WORKDIR=${WORKDIR:-}
REPO_URL=${REPO_URL:-}
REPO_REF=${REPO_REF:-main}
SKIP_CREATE=0
SKIP_INSTALL=0
DRY_RUN=${DRY_RUN:-0}
REMOTE_DIR=dlmjax  # on every worker, relative to the ssh user's home
OVERRIDES=()
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator-type) ACCELERATOR_TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --config) CONFIG=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    --repo) REPO_URL=$2; shift 2 ;;
    --ref) REPO_REF=$2; shift 2 ;;
    --skip-create) SKIP_CREATE=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *=*) OVERRIDES+=("$1"); shift ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
[ -n "$NAME" ] || die "--name (or TPU_NAME) is required"
[ -n "$ZONE" ] || die "--zone (or TPU_ZONE) is required"
[ -f "$CONFIG" ] || die "--config $CONFIG: no such file in $(pwd)"
WORKDIR=${WORKDIR:-runs/$(basename "${CONFIG%.*}")}

# gs://bucket/path -> a gcsfuse mount of the bucket on every worker
MOUNT=""
RUN_WORKDIR=$WORKDIR
if [[ "$WORKDIR" == gs://* ]]; then
  rest=${WORKDIR#gs://}
  BUCKET=${rest%%/*}
  [ -n "$BUCKET" ] || die "--workdir $WORKDIR: no bucket name"
  MOUNT=/tmp/gcs/$BUCKET
  RUN_WORKDIR=$MOUNT${rest#"$BUCKET"}
fi

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE")
[ -n "$PROJECT" ] && WHERE+=(--project "$PROJECT")

shell_quote() {  # one argument as the shell would need it, in '...' unless it is plain
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {  # print (dry run) or run one command
  if [ "$DRY_RUN" = 1 ]; then
    local sep=""
    for arg in "$@"; do printf '%s' "$sep"; shell_quote "$arg"; sep=" "; done
    echo
  else
    "$@"
  fi
}
on_all_workers() {  # one shell command on every worker of the slice, output streamed here
  run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command "$1"
}

# 1. the VM / slice
if [ "$DRY_RUN" = 1 ]; then
  echo "# create the TPU VM unless it exists"
  run "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)'
  CREATE=1
elif "${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' > /tmp/tpu_vm_state.$$ 2>/dev/null; then
  echo "reusing TPU VM $NAME ($(cat /tmp/tpu_vm_state.$$)) in $ZONE" >&2
  CREATE=0
else
  [ "$SKIP_CREATE" = 0 ] || die "TPU VM $NAME does not exist in $ZONE and --skip-create was given"
  CREATE=1
fi
rm -f /tmp/tpu_vm_state.$$
if [ "$CREATE" = 1 ] && [ "$SKIP_CREATE" = 0 ]; then
  CREATE_ARGS=(--accelerator-type "$ACCELERATOR_TYPE" --version "$VERSION")
  [ "$SPOT" = 1 ] && CREATE_ARGS+=(--spot)
  run "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" "${CREATE_ARGS[@]}"
fi

# 2. code and environment on every worker
if [ "$SKIP_INSTALL" = 0 ]; then
  if [ -n "$REPO_URL" ]; then
    on_all_workers "set -e; [ -d $REMOTE_DIR/.git ] || git clone -q $(printf '%q' "$REPO_URL") $REMOTE_DIR; \
git -C $REMOTE_DIR fetch -q origin $(printf '%q' "$REPO_REF"); git -C $REMOTE_DIR checkout -q FETCH_HEAD"
  else
    TARBALL=/tmp/dlmjax-src-$$.tar.gz
    run tar --exclude=./.git --exclude=./.venv --exclude=./runs --exclude='*/__pycache__' -czf "$TARBALL" .
    run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:dlmjax-src.tar.gz" "${WHERE[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $REMOTE_DIR; tar -xzf dlmjax-src.tar.gz -C $REMOTE_DIR"
    [ "$DRY_RUN" = 1 ] || rm -f "$TARBALL"
  fi
  # dlmjax needs Python >= 3.11; Ubuntu 22.04 TPU images ship 3.10, so install 3.11 next to it when missing
  on_all_workers "set -e; if ! command -v python3.11 >/dev/null; then sudo apt-get update -qq; \
sudo apt-get install -y -qq python3.11 python3.11-venv; fi; cd $REMOTE_DIR; \
[ -x .venv/bin/python ] || python3.11 -m venv .venv; .venv/bin/pip install -q --upgrade pip; \
.venv/bin/pip install -q -e '.[tpu]'"
fi
if [ -n "$MOUNT" ]; then
  # orbax commits a step by renaming its directory: gcsfuse needs --rename-dir-limit for that
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
echo 'deb https://packages.cloud.google.com/apt gcsfuse-jammy main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
curl -fsS https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null; \
sudo apt-get update -qq; sudo apt-get install -y -qq gcsfuse; fi; mkdir -p $MOUNT; \
mountpoint -q $MOUNT || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET $MOUNT"
fi

# 3. the same command on every worker; each worker's output is prefixed by gcloud and streamed here
TRAIN=(.venv/bin/dlmjax train --config "$CONFIG" --workdir "$RUN_WORKDIR" "${OVERRIDES[@]}")
printf -v TRAIN_CMD '%q ' "${TRAIN[@]}"
on_all_workers "cd $REMOTE_DIR && ${TRAIN_CMD% }"
