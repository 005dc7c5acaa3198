"""Benchmark backends, one module each, chosen by `bench.backend`: `hf` (transformers `generate` on the in-memory
model) and `vllm` (vLLM's offline engine on the saved folder, in a child process: `_vllm_engine`, with the vLLM
workarounds in quantbench.upstream.vllm_cpu). Each defines a `base.Backend` subclass (its knobs, its checks, its
`run`) and an instance of it named `BACKEND`; `quantbench.job.bench` finds them by module name."""
