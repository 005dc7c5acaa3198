#!/usr/bin/env bash
# benchmarks/gpu/queue.sh start PLAN | poll SECONDS — a GPU stretch's jobs, one after another, in a process session of
# their own on the GPU test machine, so that they outlive one device command (10 minutes); after
# `benchmarks/gpu/device.sh install`. Each command of the stretch then polls; whatever has finished when the device
# time runs out is already under $OUT.
#
#   start PLAN     run PLAN, a bash file of `job` and `step` lines (benchmarks/gpu/plans/), in the background
#   poll SECONDS   wait up to SECONDS for PLAN to end (keep it inside the command's limit), then copy the store
#                  and a search's study (consistent SQLite backups while jobs write) and every log to $OUT and print
#                  what each job said
#
# In PLAN:
#   job NAME METHOD [OVERRIDES...]   one seed_shape job (benchmarks/gpu/seed_shape.sh: 8B shape, this machine's
#                                    hardware config), into the stretch's one store; log NAME.log
#   step NAME COMMAND...             any command in the installed environment; log NAME.log
#   seed FOLDER                      start the stretch's store and study from a committed stretch's (FOLDER/mlflow.db,
#                                    FOLDER/optuna.db), so that one report holds every stretch's runs
# Environment set on a `job` line (e.g. `QUANTBENCH_HUMMING_OPS_FIRST=0 job ...`) reaches its job only.
# Check a plan on a CPU machine before a GPU runs it: .venv/bin/python benchmarks/gpu/check_plan.py PLAN
set -uo pipefail
W=${QB_QUEUE_DIR:-/tmp/qb-queue}
HERE=$(cd "$(dirname "$0")" && pwd)
case "${1:?start PLAN | poll SECONDS}" in
  start)
    mkdir -p "$W/logs"
    setsid nohup bash "$0" run "$(realpath "${2:?PLAN}")" > "$W/logs/queue.log" 2>&1 < /dev/null &
    echo "started $2: $W/logs/queue.log" ;;
  run)
    cd "$HERE/../.."
    # conf/hardware of this machine's GPU (a plan names it as $QB_HARDWARE where it runs run.py itself)
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    case "$name" in *H200*) hw=h200 ;; *H100*) hw=h100 ;; *) hw=cpu ;; esac
    export QB_HARDWARE=${QB_HARDWARE:-$hw}
    note() { echo "$(date +%T) $*"; }
    job() {
      local name=$1; shift
      note "job $name start"
      OUT=$W/logs QB_LOG=$name QB_MLRUNS=$W/mlruns QB_JOB_TIMEOUT=${QB_JOB_TIMEOUT:-900} \
        bash "$HERE/seed_shape.sh" "$@" > /dev/null 2>&1
      note "job $name exit $?"; tidy
    }
    # A job folder's model is a copy (fp16) or hard links into the quantized-model cache: removed after each job or
    # step, so that a 64 GB disk holds the cache and not every job's copy as well (jobs refuse to start without room
    # for their artifact: disk_headroom_gb). A plan's jobs therefore keep tracking.log_model at copy or none (the
    # seed_shape and search experiments' none), never reference, whose runs point into these folders.
    tidy() { rm -rf multirun/*/*/model-*; note "disk: $(df -h --output=avail . | tail -1) free"; }
    step() {
      local name=$1; shift
      note "step $name start"
      bash "$HERE/device.sh" run "$@" > "$W/logs/$name.log" 2>&1
      note "step $name exit $?"; tidy
    }
    seed() {
      mkdir -p "$W/mlruns"
      for db in mlflow.db optuna.db; do [ -e "$W/mlruns/$db" ] || cp "$1/$db" "$W/mlruns/"; done
    }
    # shellcheck source=/dev/null
    source "$2"
    note "queue done"; touch "$W/done" ;;
  poll)
    for _ in $(seq "${2:-540}"); do [ -e "$W/done" ] && break; sleep 1; done
    for db in mlflow.db optuna.db; do  # the MLflow store, and a search's study beside it
      [ -e "$W/mlruns/$db" ] && bash "$HERE/device.sh" run python -c \
        "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
        "$W/mlruns/$db" "${OUT:?}/$db"
    done
    tar -C "$W" -cJf "$OUT/logs.tar.xz" logs 2>/dev/null
    cat "$W/logs/queue.log"; df -h / | tail -1
    for f in "$W"/logs/*.log; do
      case "$f" in */queue.log) continue ;; esac
      echo "== $(basename "$f")"
      grep -aE "import vllm|engine ready|stream\(s\):|Finished|FAILED|rror|passed|failed|concurrency" "$f" \
        | grep -avE "^W[0-9]{4} " | tail -6 | cut -c1-330
    done
    [ -e "$W/done" ] && echo "queue done" || echo "queue still running" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
