"""The job: one quantization job as stages, the methods, the benchmark backends, the quantized-model cache."""
