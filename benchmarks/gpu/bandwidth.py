"""Measured memory bandwidth of the visible GPU: what decoding one token can at best stream, beside the datasheet.

The roofline in quantbench uses the hardware config's datasheet bandwidth; this prints what a plain read (a sum over
a large tensor: every byte read once) and a device-to-device copy (read + write) reach on this card, so that a
tokens/s fraction can also be read against an achievable bound. Prints JSON: GB/s (1e9 bytes), median of the runs.

    python benchmarks/gpu/bandwidth.py [--gib 4] [--runs 20]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def timed(fn, runs: int) -> float:
    """Median seconds of `fn` over `runs` CUDA-event-timed calls, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0, help="tensor size in GiB (default 4)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs (default 20)")
    args = parser.parse_args()
    n = int(args.gib * 2**30) // 2
    x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    read_s = timed(lambda: x.sum(dtype=torch.float32), args.runs)
    copy_s = timed(lambda: y.copy_(x), args.runs)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
                "bytes": nbytes,
                "read_gb_s": round(nbytes / read_s / 1e9, 1),
                "copy_gb_s_read_plus_write": round(2 * nbytes / copy_s / 1e9, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
