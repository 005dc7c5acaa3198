# The GPU stretch after 2026-12-07 evening's (benchmarks/gpu/queue.sh start THIS), in order of need: energy per token
# under load (issue 30: the evening's serving ran, but vLLM 0.26's JSON left energy out), the engine start of one
# artifact back to back (issue 29), the Hopper rows still missing (issue 29), then the search continued (issue 31).
# The evening's store and study seed this machine's, so that one report holds every stretch's runs.
# Disk (64 GB): the base model is 16 GB; only the pair that must share an artifact keeps the quantized-model cache,
# queue.sh removes each job folder's model after its job or step, and the search runs one trial a step (n_trials
# counts the study's trials, a retried stale one once) so that its folders go between trials.
mkdir -p "$W/mlruns"
for db in mlflow.db optuna.db; do
  [ -e "$W/mlruns/$db" ] || cp benchmarks/results/2026-12-07-h100-eve/$db "$W/mlruns/"
done
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)
NOCACHE=(quantized_cache.enabled=false)

job 1-serve-fp8-energy fp8 "${SERVE[@]}" "${NOCACHE[@]}"
job 2-best-warm-in-process "${BEST[@]}" "${S[@]}" bench.vllm.engine_core=in_process
job 3-best-warm-again "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 4-fp16-in-float16 fp16 bench.vllm.dtype=float16 "${S[@]}"
job 5-nvfp4 nvfp4 "${S[@]}" "${NOCACHE[@]}"
# the warm start again with the engine core in its own process (the default on CUDA), in case in_process fails
job 5b-best-warm-separate "${BEST[@]}" "${S[@]}" force=true
job 6-w8a8-int8 w8a8_int8 calibration.num_samples=32 "${S[@]}" "${NOCACHE[@]}"
for n in 4 5 6; do
  step 7-search-$n python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=$n paths.mlruns="$W/mlruns" "${NOCACHE[@]}"
done
