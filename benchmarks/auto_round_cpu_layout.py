"""auto-round's plain-torch CPU kernel with and without quantbench.upstream.quantizers.auto_round_linear_layout.

For one 4-bit layer (random packed weights, group 128) of each shape given, in bfloat16: milliseconds per forward
as auto-round computes it (torch.matmul by a contiguous [in, out] weight) and in nn.Linear's layout, their ratio,
and each output's largest distance to the same forward in float32 (relative to the largest output). Not a test: the
numbers belong to the CPU they came from (torch's bfloat16 GEMM is native with AVX512_BF16 or AMX, emulated on AVX2).

    .venv/bin/python benchmarks/auto_round_cpu_layout.py                 # the embedded model's and 8B shapes
    .venv/bin/python benchmarks/auto_round_cpu_layout.py --tokens 64 --shapes 256x768 4096x14336
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from quantbench.measure import CPU_ISA_FLAGS, cpu_info
from quantbench.upstream import quantizers

log = logging.getLogger("benchmarks.auto_round_cpu_layout")


def layer(infeatures: int, outfeatures: int, cls: type | None = None) -> torch.nn.Module:
    """A 4-bit layer of auto-round's torch kernel with random packed weights, zero points and scales; by default of
    the auto_round format (zero points packed, as auto-round exports symmetric weights)."""
    g = torch.Generator().manual_seed(0)
    cls = cls or quantizers.auto_round_torch_layers()[1]
    m = cls(bits=4, group_size=128, infeatures=infeatures, outfeatures=outfeatures, bias=False)
    for name in ("qweight", "qzeros"):
        buf = getattr(m, name)
        buf.copy_(torch.randint(-(2**31), 2**31 - 1, buf.shape, generator=g, dtype=torch.int64).to(torch.int32))
    m.scales.copy_(torch.rand(m.scales.shape, generator=g) * 0.02 + 0.001)
    return m


def ms_per_forward(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    model(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=64, help="rows of the input (default: %(default)s)")
    p.add_argument("--shapes", nargs="+", default=["256x768", "768x256", "4096x14336"], help="INxOUT per layer")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per measurement (default: %(default)s)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model_name, flags = cpu_info()
    isa = " ".join(f for f in CPU_ISA_FLAGS if f in flags)
    log.info("CPU: %s (%s), torch %s, %d threads", model_name, isa, torch.__version__, torch.get_num_threads())
    log.info(
        "%-12s %14s %14s %7s %16s %16s", "layer", "auto-round ms", "linear ms", "ratio", "err auto-round", "err linear"
    )
    for shape in args.shapes:
        infeatures, outfeatures = map(int, shape.split("x"))
        x = torch.randn(args.tokens, infeatures, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
        m = layer(infeatures, outfeatures)
        model = torch.nn.Sequential(m)
        with torch.no_grad():
            in_float32 = m(x.float()).float()
            plain_out, plain_ms = m(x).float(), ms_per_forward(model, x, args.repeats)
            quantizers.auto_round_linear_layout(model)
            linear_out, linear_ms = m(x).float(), ms_per_forward(model, x, args.repeats)
        scale = in_float32.abs().max()
        err = [((out - in_float32).abs().max() / scale).item() for out in (plain_out, linear_out)]
        log.info("%-12s %14.2f %14.2f %7.1f %16.2e %16.2e", shape, plain_ms, linear_ms, plain_ms / linear_ms, *err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
