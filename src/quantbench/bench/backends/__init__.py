"""Benchmark backends, one module each, chosen by `bench.backend`: `hf` (transformers `generate` on the in-memory
model) and `vllm` (vLLM's offline engine on the saved folder, in a child process: `_vllm_engine`, with the vLLM
workarounds in quantbench.upstream.vllm_cpu). Each exposes `run(plan, model, tokenizer, model_dir, hardware) -> BenchResult`."""
