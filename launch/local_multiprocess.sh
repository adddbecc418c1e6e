#!/usr/bin/env bash
# Run one `dlmjax train` job as N processes on this machine (what a multi-host job does, on one host).
#
# usage: launch/local_multiprocess.sh [-n N] [--devices-per-process D] [--platform cpu|gpu] [--port PORT]
#                                     [--logdir DIR] [--dry-run] [--] --config CONFIG --workdir DIR [overrides...]
#
#   -n, --num-processes N      processes to start (env NUM_PROCESSES, default 2)
#   --devices-per-process D    cpu: fake CPU devices per process (XLA_FLAGS); gpu: GPUs per process, process i
#                              gets GPUs i*D..i*D+D-1 through DLMJAX_LOCAL_DEVICE_IDS (env DEVICES_PER_PROCESS, 1)
#   --platform cpu|gpu         env PLATFORM, default cpu (gloo collectives between the processes)
#   --port PORT                coordinator port on 127.0.0.1 (env PORT, default: a free port)
#   --logdir DIR               process i writes DIR/process_<i>.log (env LOGDIR, default <workdir>/logs)
#   --dry-run                  print each process's command and environment, start nothing
#   everything else            arguments of `dlmjax train` (the same for every process)
#
# Each process gets DLMJAX_COORDINATOR=127.0.0.1:PORT, DLMJAX_NUM_PROCESSES=N, DLMJAX_PROCESS_ID=i (read by
# dlmjax.distributed). Process 0 logs and writes metrics; all of them write the checkpoint. The script waits for
# all processes; if one fails it stops the others (they would wait for their peer forever) and exits with the
# failed process's status after printing the end of its log. Set DLMJAX to the command to run (default
# .venv/bin/dlmjax, else dlmjax on PATH).
#
# example: launch/local_multiprocess.sh -n 2 --config configs/demo.yaml --workdir runs/demo_mp train.steps=200
set -euo pipefail
cd "$(dirname "$0")/.."

N=${NUM_PROCESSES:-2}
D=${DEVICES_PER_PROCESS:-1}
PLATFORM=${PLATFORM:-cpu}
PORT=${PORT:-}
LOGDIR=${LOGDIR:-}
DRY_RUN=${DRY_RUN:-0}
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -n|--num-processes) N=$2; shift 2 ;;
    --devices-per-process) D=$2; shift 2 ;;
    --platform) PLATFORM=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --logdir) LOGDIR=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; ARGS+=("$@"); break ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }
[[ "$N" =~ ^[1-9][0-9]*$ ]] || die "-n/NUM_PROCESSES=$N must be a positive integer"
[[ "$D" =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process/DEVICES_PER_PROCESS=$D must be a positive integer"
[[ "$PLATFORM" == cpu || "$PLATFORM" == gpu ]] || die "--platform/PLATFORM=$PLATFORM must be cpu or gpu"
[ ${#ARGS[@]} -gt 0 ] || die "no \`dlmjax train\` arguments; e.g. -- --config configs/demo.yaml --workdir runs/mp"

WORKDIR=runs/local_multiprocess
for ((k = 0; k < ${#ARGS[@]}; k++)); do
  [ "${ARGS[$k]}" = "--workdir" ] && [ $((k + 1)) -lt ${#ARGS[@]} ] && WORKDIR=${ARGS[$((k + 1))]}
done
LOGDIR=${LOGDIR:-$WORKDIR/logs}
if [ -z "$PORT" ]; then
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
         2>/dev/null || echo $((20000 + RANDOM % 20000)))
fi
if [ -z "${DLMJAX:-}" ]; then
  if [ -x .venv/bin/dlmjax ]; then DLMJAX=.venv/bin/dlmjax; else DLMJAX=dlmjax; fi
fi

env_of() {  # the variables process $1 runs with
  local i=$1
  local vars=("DLMJAX_COORDINATOR=127.0.0.1:$PORT" "DLMJAX_NUM_PROCESSES=$N" "DLMJAX_PROCESS_ID=$i")
  if [ "$PLATFORM" = cpu ]; then
    vars+=("JAX_PLATFORMS=cpu" "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$D")
  else
    local ids
    ids=$(seq -s, $((i * D)) $((i * D + D - 1)))
    vars+=("DLMJAX_LOCAL_DEVICE_IDS=$ids")
  fi
  printf '%s\n' "${vars[@]}"
}

if [ "$DRY_RUN" = 1 ]; then
  for ((i = 0; i < N; i++)); do
    mapfile -t VARS < <(env_of "$i")
    printf 'env'; printf ' %q' "${VARS[@]}" "$DLMJAX" train "${ARGS[@]}"
    printf ' > %q 2>&1 &\n' "$LOGDIR/process_$i.log"
  done
  echo "wait  # all $N processes; exit status: the first failure's"
  exit 0
fi

mkdir -p "$LOGDIR"
PIDS=()
cleanup() {  # only the processes this script started
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 143' TERM INT
for ((i = 0; i < N; i++)); do
  mapfile -t VARS < <(env_of "$i")
  env "${VARS[@]}" "$DLMJAX" train "${ARGS[@]}" > "$LOGDIR/process_$i.log" 2>&1 &
  PIDS+=($!)
done
echo "started $N processes (coordinator 127.0.0.1:$PORT); logs: $LOGDIR/process_<i>.log" >&2
tail -n +1 -F "$LOGDIR/process_0.log" 2>/dev/null &  # stream process 0, the one that logs
TAIL=$!

STATUS=0
RUNNING=("${PIDS[@]}")
while [ ${#RUNNING[@]} -gt 0 ]; do
  DONE=
  set +e
  wait -n -p DONE "${RUNNING[@]}"  # bash >= 5.1
  rc=$?
  set -e
  [ -n "$DONE" ] || break  # nothing left to wait for (already reaped)
  LEFT=()
  for pid in "${RUNNING[@]}"; do [ "$pid" = "$DONE" ] || LEFT+=("$pid"); done
  RUNNING=("${LEFT[@]}")
  if [ "$rc" -ne 0 ] && [ "$STATUS" -eq 0 ]; then
    STATUS=$rc
    for ((i = 0; i < N; i++)); do [ "${PIDS[$i]}" = "$DONE" ] && FAILED=$i; done
    echo "process $FAILED (pid $DONE) exited with status $rc; stopping the others. End of its log:" >&2
    tail -n 30 "$LOGDIR/process_$FAILED.log" >&2 || true
    for pid in "${RUNNING[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${RUNNING[@]}"; do wait "$pid" 2>/dev/null || true; done
    break
  fi
done
kill "$TAIL" 2>/dev/null || true
wait "$TAIL" 2>/dev/null || true
if [ "$STATUS" -eq 0 ]; then echo "all $N processes finished; logs in $LOGDIR" >&2; fi
exit "$STATUS"
