"""Quantization methods: one module per method, one small shared interface (`base.Method`).

A method is built from `conf/method/<name>.yaml` through its `_target_`; the pipeline never asks which it is.
"""
