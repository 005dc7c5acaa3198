# GPU stretch of 2026-12-07 with ~250 s of device time left after staging (the full plan, 2026-12-07.sh, needs ~30
# minutes; the GPU tests of the energy counter and the humming ops run before it): the best W4A16 configuration
# cold, its decode step kernel by kernel, and the same artifact warm in one process and then in two (the engine start
# back to back).
S=(bench.streams=[1,8,32] bench.vllm.kv_cache_gb=2)
BEST=(rtn method.quantize_lm_head=true bench.vllm.dtype=float16 bench.vllm.linear_backend=humming)

job 1-best-cold "${BEST[@]}" "${S[@]}"
step 5-decode-profile python benchmarks/gpu/decode_profile.py "$(grep -aom1 '/[^ ]*/served/[0-9a-f]*' "$W/logs/1-best-cold.log")" --dtype float16 --linear-backend humming
job 2-best-warm-in-process "${BEST[@]}" "${S[@]}" force=true bench.vllm.engine_core=in_process
job 3-best-warm-separate "${BEST[@]}" "${S[@]}" force=true
