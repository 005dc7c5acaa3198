#!/usr/bin/env bash
# benchmarks/gpu/seed_hub.sh start|pipeline|poll [SECONDS] — `experiment=seed` through a local hub on the GPU test
# machine (issue 26 item 5), after `benchmarks/gpu/device.sh install`: the 8B-shape model served by
# tests/helpers/hub.py under the seed's gated repo ids, the seed's hub datasets (cais/mmlu, allenai/ai2_arc, allenai/c4,
# Salesforce/wikitext) and quantbench's own AQLM checkpoint under aqlm_2bit_pretrained's repo id; then
# `python run.py -m experiment=seed hardware=h100` as a user types it, with HF_ENDPOINT/HF_TOKEN pointing at that hub.
#
#   start          the pipeline in its own process session, so that it outlives one device command (10 minutes)
#   pipeline       what `start` runs (logs, store and report under /tmp/qb-seed)
#   poll SECONDS   wait up to SECONDS for the pipeline to end, then copy its store, report and logs to $OUT
#
# Sized for one session's device time (every size below is a command-line override, logged as a param): 10 MMLU
# questions per subject and 10 ARC questions, 32 calibration texts, 1024 tokens of KL/perplexity, one timed run per
# stream count, vLLM in eager mode (no torch.compile or CUDA graphs: engine start ~30 s instead of 90-150 s, at a
# lower tokens/s), AutoRound at 10 iterations. Three lanes share the card (its tokens/s are not comparable to the
# study's: another job may run on the GPU meanwhile), each vLLM engine capped at 30 % of its memory.
set -uo pipefail
W=${QB_SEED_DIR:-/tmp/qb-seed}
cd "$(dirname "$0")/../.."
D="bash benchmarks/gpu/device.sh run"
HW=${QB_HARDWARE:-h100}  # conf/hardware: h100 or h200 (cpu with QB_MODEL=embedded:tiny: a dry run here)
MODEL=${QB_MODEL:-embedded:llama-3.1-8b-shape}
case "${1:?start|pipeline|poll}" in
  start)
    mkdir -p "$W/logs"
    setsid nohup bash "$0" pipeline > "$W/logs/pipeline.log" 2>&1 < /dev/null &
    echo "started: $W/logs/pipeline.log" ;;
  poll)
    for _ in $(seq "${2:-540}"); do [ -e "$W/done" ] && break; sleep 1; done
    [ -e "$W/mlruns/mlflow.db" ] && $D python -c "import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))" \
      "$W/mlruns/mlflow.db" "${OUT:?}/mlflow.db"  # a consistent copy while jobs write
    tar -C "$W" -cJf "$OUT/logs.tar.xz" logs report 2>/dev/null
    grep -h "^[0-9:]* \(lane\|step\)" "$W/logs/pipeline.log"; df -h / | tail -1
    for f in "$W"/logs/*.log; do
      echo "== $(basename "$f")"; grep -aE "quantbench\.(pipeline|bench)\]|FAILED|rror" "$f" | tail -4 | cut -c1-400
    done
    [ -e "$W/done" ] && echo "pipeline done" || echo "pipeline still running" ;;
  pipeline)
    note() { echo "$(date +%T) $*"; }
    note "step hub repositories (8B shape, datasets)"
    $D python tests/helpers/hub_repos.py --root "$W/hub" --model "$MODEL" --no-aqlm \
      > "$W/logs/0-hub-repos.log" 2>&1 || { note "step hub repositories FAILED"; touch "$W/done"; exit 1; }
    $D python tests/helpers/hub.py --root "$W/hub" --port 8765 --token hf_local > "$W/logs/hub.log" 2>&1 &
    for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/8765) 2>/dev/null && break; sleep 1; done  # it hashes first
    note "step hub up"
    export HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_local
    # The Hugging Face cache in memory (128 GB): on the 64 GB disk, the 8B shape (16 GB), the cache's copy of it
    # (16 GB) and three lanes' artifacts fill it (benchmarks/results/2026-12-06-h100: AutoRound's save failed).
    export HF_HOME=${QB_HF_HOME:-/dev/shm/qb-hf}
    sizes=(repeats=1 eval.limit=10 calibration.num_samples=32 quality.num_tokens=1024 bench.repeats=1
           bench.vllm.enforce_eager=true bench.vllm.gpu_memory_utilization=0.3 tracking.log_model=none
           quantized_cache.enabled=false "paths.mlruns=$W/mlruns")
    read -ra extra <<< "${QB_EXTRA:-}"  # more overrides, e.g. the embedded model's sizes for a dry run on CPU
    job() {  # job LANE METHOD [OVERRIDES...]: one method's sweep; its saved weights are removed after (disk: 64 GB)
      local lane=$1 method=$2; shift 2
      note "lane $lane $method start"
      $D python run.py -m experiment=seed "hardware=$HW" "method=$method" "${sizes[@]}" "${extra[@]}" "$@" \
        "hydra.sweep.dir=$W/multirun/$method" > "$W/logs/$lane-$method.log" 2>&1
      note "lane $lane $method exit $?"
      find "$W/multirun/$method" -name '*.safetensors' -delete
    }
    (job a fp16; job a bnb_nf4; job a awq) & lanes=($!)
    (job b gptq method.backend=marlin; job b autoround_sym method.iters=10) & lanes+=($!)
    (note "step AQLM checkpoint (2x8 codebooks, shortest search)"
     $D python tests/helpers/hub_repos.py --root "$W/hub" --model "$MODEL" --hardware "$HW" \
       --aqlm-override method.codebooks=2x8 --aqlm-override method.kmeans_iters=0 \
       --aqlm-override method.max_rounds=1 --aqlm-override method.finetune_epochs=0 > "$W/logs/c-hub-aqlm.log" 2>&1
     note "step AQLM checkpoint exit $?"
     job c aqlm_2bit_pretrained) & lanes+=($!)
    wait "${lanes[@]}"
    note "step report"
    $D quantbench report --tracking-uri "sqlite:///$W/mlruns/mlflow.db" --experiment seed-llama-3.1-8b-instruct \
      --sweep all --out "$W/report" --no-log > "$W/logs/report.log" 2>&1
    note "step report exit $?"
    touch "$W/done" ;;
esac
