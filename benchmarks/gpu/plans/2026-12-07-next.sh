# The next GPU stretch after 2026-12-07's (benchmarks/gpu/queue.sh start THIS), in order of need: serving under load
# for three methods with the server's new entry module (issue 30: it failed at start on 2026-12-07), the H100 search
# continued from its committed study (issue 31: 2 of 3 trials finished), then the engine start of one artifact back
# to back and the Hopper rows still missing (issue 29).
# The afternoon's store and study seed this machine's, so that the search continues and one report holds both.
mkdir -p "$W/mlruns" && cp -n benchmarks/results/2026-12-07-h100-pm/mlflow.db benchmarks/results/2026-12-07-h100-pm/optuna.db "$W/mlruns/"
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)

job 1-serve-fp16 fp16 "${SERVE[@]}"
job 2-serve-best "${BEST[@]}" "${SERVE[@]}"
job 3-serve-fp8 fp8 "${SERVE[@]}"
step 4-search python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=8 paths.mlruns="$W/mlruns"
job 5-best-warm-in-process "${BEST[@]}" "${S[@]}" bench.vllm.engine_core=in_process
job 6-best-warm-again "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 7-nvfp4 nvfp4 "${S[@]}"
job 8-fp16-in-float16 fp16 bench.vllm.dtype=float16 "${S[@]}"
job 9-w8a8-int8 w8a8_int8 calibration.num_samples=32 "${S[@]}"
