"""Models and tasks that quantbench builds itself, so that every code path runs offline: `tiny` (the embedded
default: a small Llama trained on generated facts, with its lm-eval tasks) and `random_shape` (real architectures
such as Llama-3.1-8B with seeded random weights, for speed and size on a GPU without the hub)."""
