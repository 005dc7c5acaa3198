# The GPU stretch after 2026-12-08's (benchmarks/gpu/queue.sh start THIS), in order of need (a stretch of 30 minutes
# holds about 25 minutes of jobs after the install, so the decisive ones go first):
# 1. The best artifact's second start with one Triton cache for every engine (upstream/vllm_cpu.py, workaround 6: on
#    2026-12-08 the second start JIT-compiled vLLM's sampler kernels again, 20 s of its 49.2 s; the third took 28.7 s):
#    a cold start, then a second (issue 29: engine start <= 30 s), a listing of every Triton cache folder on the
#    machine (the job log names the TRITON_CACHE_DIR its engine ended with), then a start with an empty Triton cache
#    of its own, back to back: what the second start costs without the shared cache, and the tokens/s with and
#    without it.
# 2. bnb_nf4 under load (issue 30 lists it among the formats to serve at 1-64 users; none has run on a GPU).
# 3. The H100 search continued (issue 31: two trials have finished), one trial a step.
# 4. BF16 under load with energy (2026-12-08's was cut off).
seed benchmarks/results/2026-12-08-h100
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming
      bench.vllm.engine_core=in_process)
SERVE=(bench=serving bench.vllm.kv_cache_gb=4 hardware.cost_per_hour=3.0)
NOCACHE=(quantized_cache.enabled=false)
# each Triton cache folder (vLLM's per compile cache, Triton's default, ours) with its count of kernel folders
TRITON_CACHES=(bash -c 'for d in .cache/vllm/torch_compile_cache/*/*/inductor_cache/triton/* ~/.triton/cache \
  .cache/vllm/triton; do [ -d "$d" ] && echo "$d: $(ls "$d" | wc -l) entries, newest $(ls -t "$d" | head -1)"; done; true')

job 1-best-cold "${BEST[@]}" "${S[@]}"
job 2-best-second "${BEST[@]}" "${S[@]}" force=true
step 2t-triton "${TRITON_CACHES[@]}"
TRITON_CACHE_DIR=/tmp/triton-empty job 3-best-own-triton-cache "${BEST[@]}" "${S[@]}" force=true
job 4-serve-nf4 bnb_nf4 "${SERVE[@]}" "${NOCACHE[@]}"
if [ "$QB_HARDWARE" = h100 ]; then  # the study's trials so far ran on an H100: another card's speeds would not compare
  for n in 4 5 6; do
    step 5-search-$n python run.py -m search=w4a16_h100 hardware="$QB_HARDWARE" hydra.sweeper.n_trials=$n paths.mlruns="$W/mlruns" "${NOCACHE[@]}"
  done
fi
job 6-serve-fp16-energy fp16 "${SERVE[@]}"
