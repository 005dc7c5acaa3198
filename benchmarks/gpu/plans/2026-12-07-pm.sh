# GPU stretch of 2026-12-07, afternoon (~20 minutes after staging; benchmarks/gpu/queue.sh start THIS), in order of
# need: the NVML energy test as rewritten (never run on a GPU), serving under load for three methods at concurrency
# 1-64 with NVML energy and a stated price (issue 30), then a short search over W4A16 settings (issue 31; Optuna is
# in the CUDA lock from this stretch on), then the same best artifact started warm (issue 29, engine start).
# Every job: Llama-3.1-8B shape, random weights, 100 + 250 tokens.
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)

step 0-gpu-tests python -m pytest -p no:cacheprovider -m gpu -q tests/job/bench/test_energy.py tests/gpu/test_humming_ops.py
job 1-serve-best "${BEST[@]}" "${SERVE[@]}"
job 2-serve-fp16 fp16 "${SERVE[@]}"
job 3-serve-fp8 fp8 "${SERVE[@]}"
step 4-search python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=3 paths.mlruns="$W/mlruns"
job 5-best-warm-in-process "${BEST[@]}" "${S[@]}" bench.vllm.engine_core=in_process
