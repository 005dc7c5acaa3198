# The GPU stretch after 2026-12-08's (benchmarks/gpu/queue.sh start THIS), in order of need:
# 1. The best artifact's second start with one Triton cache for every engine (upstream/vllm_cpu.py, workaround 6:
#    on 2026-12-08 the second start JIT-compiled vLLM's sampler kernels again, 20 s of its 49.2 s; the third took
#    28.7 s): three starts of one artifact with the engine core in process, each followed by a listing of every
#    Triton cache folder on the machine (the job log names the TRITON_CACHE_DIR its engine ended with), the second
#    one sampled; then a fourth start with an empty Triton cache of its own, back to back, for the tokens/s with and
#    without the shared one.
# 2. BF16 under load with energy (issue 30; 2026-12-08's was cut off).
# 3. The search continued (issue 31).
seed benchmarks/results/2026-12-08-h100
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming
      bench.vllm.engine_core=in_process)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)
NOCACHE=(quantized_cache.enabled=false)
# each Triton cache folder (vLLM's per compile cache, and Triton's default) with its count of kernel folders
TRITON_CACHES=(bash -c 'for d in .cache/vllm/torch_compile_cache/*/rank_*/triton_cache ~/.triton/cache; do
  [ -d "$d" ] && echo "$d: $(ls "$d" | wc -l) entries, newest $(ls -t "$d" | head -1)"; done; true')

job 1-best-cold "${BEST[@]}" "${S[@]}"
step 2-triton-after-cold "${TRITON_CACHES[@]}"
QUANTBENCH_SAMPLE_ENGINE_START=1 job 3-best-second "${BEST[@]}" "${S[@]}" force=true
step 4-triton-after-second "${TRITON_CACHES[@]}"
job 5-best-third "${BEST[@]}" "${S[@]}" force=true
step 6-triton-after-third "${TRITON_CACHES[@]}"
TRITON_CACHE_DIR=/tmp/triton-empty job 6b-best-own-triton-cache "${BEST[@]}" "${S[@]}" force=true
job 7-serve-fp16-energy fp16 "${SERVE[@]}"
for n in 4 5 6; do
  step 8-search-$n python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=$n paths.mlruns="$W/mlruns" "${NOCACHE[@]}"
done
