#!/usr/bin/env bash
# benchmarks/gpu/seed_shape.sh METHOD [OVERRIDES...] — one job of the seed study in Llama-3.1-8B shape on the GPU test
# machine, sized for one device command (10 minutes): run after staging (benchmarks/gpu/device.sh). The store
# accumulates in /tmp/qb-mlruns (QB_MLRUNS) while the machine stays up; its SQLite file and the job's log are copied to
# $OUT after every job, so that nothing measured is lost when the machine goes back. Two jobs at once on a machine of
# two GPUs: one store each (SQLite takes one writer), e.g.
#   CUDA_VISIBLE_DEVICES=1 QB_MLRUNS=/tmp/qb-aqlm bash benchmarks/gpu/seed_shape.sh aqlm_2bit ...   ($OUT/qb-aqlm.db)
# QB_STORE_SEED=<a committed mlflow.db> starts a machine's store from an earlier stretch's, so that the runs of several
# stretches (and machines) end in one store and one report.
# Example:
#   bash benchmarks/gpu/seed_shape.sh gptq method.backend=marlin
#   bash benchmarks/gpu/seed_shape.sh autoround_sym method.iters=50 method.nsamples=32   (shortened: logged as params)
#   QB_LOG=awq-again bash benchmarks/gpu/seed_shape.sh awq force=true   (the log's name: $OUT/awq-again.log)
set -uo pipefail
method=${1:?method}; shift
out=${OUT:-/tmp/qb-out}; store=${QB_MLRUNS:-/tmp/qb-mlruns}; mkdir -p "$out" "$store"
if [ -n "${QB_STORE_SEED:-}" ] && [ ! -e "$store/mlflow.db" ]; then cp "$QB_STORE_SEED" "$store/mlflow.db"; fi
limit=${QB_JOB_TIMEOUT:-560}
timeout "$limit" bash "$(dirname "$0")/device.sh" run python3 run.py -m experiment=seed_shape "method=$method" \
  "hardware=${QB_HARDWARE:-h100}" paths.mlruns="$store" "$@" 2>&1 \
  | grep -v "Warning\|warn(" > "$out/${QB_LOG:-$method}.log"
code=$?
db=mlflow.db; [ -n "${QB_MLRUNS:-}" ] && db=$(basename "$store").db
cp "$store/mlflow.db" "$out/$db" 2>/dev/null
grep -E "Finished |engine ready|stream\(s\):|rror" "$out/${QB_LOG:-$method}.log" | tail -12 | cut -c1-600
exit $code
