# GPU stretch of 2026-12-07 (benchmarks/gpu/queue.sh start benchmarks/gpu/plans/2026-12-07.sh), in order of need:
# the engine start back to back on one artifact (issue 29 item 3) and a decode step kernel by kernel, the GPU tests,
# serving under load for three methods with NVML energy (issue 30), then the Hopper rows still missing (issue 29
# item 4) and a short search (issue 31).
# Every job: Llama-3.1-8B shape, random weights, 100 + 250 tokens, median of 3 (bench=seed) at 1, 8 and 32 streams.
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)

step 0-import python -c "import time; t = time.perf_counter(); import vllm; print(f'import vllm {time.perf_counter() - t:.1f} s')"
job 1-best-cold "${BEST[@]}" "${S[@]}"
job 2-best-warm-in-process "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 3-best-warm-separate "${BEST[@]}" "${S[@]}" force=true
QUANTBENCH_HUMMING_OPS_FIRST=0 job 4-best-warm-separate-no-ops-first "${BEST[@]}" "${S[@]}" force=true
step 5-decode-profile python benchmarks/gpu/decode_profile.py "$(grep -aom1 '/[^ ]*/served/[0-9a-f]*' "$W/logs/1-best-cold.log")" --dtype float16 --linear-backend humming
step 6-gpu-tests python -m pytest -p no:cacheprovider -m gpu -q tests/job/bench/test_energy.py tests/gpu/test_humming_ops.py tests/gpu/test_pipeline_cuda.py -k "humming or energy or nvml"
job 7-serve-best "${BEST[@]}" "${SERVE[@]}"
job 8-serve-fp16 fp16 "${SERVE[@]}"
job 9-serve-fp8 fp8 "${SERVE[@]}"
job 10-best-warm-in-process-again "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 11-nvfp4 nvfp4 "${S[@]}"
job 12-fp16-in-float16 fp16 bench.vllm.dtype=float16 "${S[@]}"
job 13-fp8-kv-fp8 fp8 bench.vllm.kv_cache_dtype=fp8 "${S[@]}"
job 14-w8a8-int8 w8a8_int8 calibration.num_samples=32 "${S[@]}"
job 15-awq-head awq method.quantize_lm_head=true method.zero_point=false calibration.num_samples=32 bench.vllm.dtype=float16 bench.vllm.linear_backend=humming "${S[@]}"
# needs Optuna in the CUDA lock (benchmarks/gpu/cuda_lock.py NOT_YET_ON_GPU emptied, lock and bundle rebuilt)
step 16-search python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=4 paths.mlruns=/tmp/qb-queue/mlruns
