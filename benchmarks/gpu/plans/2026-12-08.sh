# The GPU stretch after 2026-12-07 night's (benchmarks/gpu/queue.sh start THIS), in order of need: nvfp4 (a Hopper
# row issue 29 still lacks), the best artifact cold then warm with its start sampled (the night's warm 42.6 s had
# 16.4 s after graph capture in vLLM 0.26's V2 runner warm-up, warmup_kernels; QUANTBENCH_SAMPLE_ENGINE_START logs
# where the main thread spent it), w8a8_int8, energy per token under load for W4A16 and BF16 (the night measured
# fp8's), then the search continued (issue 31).
# The night's store and study seed this machine's, so that one report holds every stretch's runs.
# Disk (64 GB): only the pair that must share an artifact keeps the quantized-model cache; queue.sh removes each job
# folder's model after its job or step, and the search runs one trial a step.
seed benchmarks/results/2026-12-07-h100-night
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)
NOCACHE=(quantized_cache.enabled=false)

job 1-nvfp4 nvfp4 "${S[@]}" "${NOCACHE[@]}"
job 2-best-cold "${BEST[@]}" "${S[@]}" bench.vllm.engine_core=in_process
QUANTBENCH_SAMPLE_ENGINE_START=1 job 3-best-warm-sampled "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 4-w8a8-int8 w8a8_int8 calibration.num_samples=32 "${S[@]}" "${NOCACHE[@]}"
job 5-best-warm-again "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 6-serve-best-energy "${BEST[@]}" "${SERVE[@]}" "${NOCACHE[@]}"
job 7-serve-fp16-energy fp16 "${SERVE[@]}"
for n in 4 5 6; do
  step 8-search-$n python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=$n paths.mlruns="$W/mlruns" "${NOCACHE[@]}"
done
