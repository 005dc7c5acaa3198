"""The hf backend's decode paths side by side on one model, each against the memory-bandwidth roofline.

Paths: dynamic KV cache (eager), static KV cache (eager), static KV cache with transformers' own compiled decode
step (only where transformers compiles: CUDA/XPU). Same plan as the seed: 100 prompt tokens, 250 generated, 1 and 8
streams, one warm-up, 3 timed repeats. Not a test: the numbers belong to the machine they came from.

    .venv/bin/python benchmarks/hf_paths.py --model-dir .cache/quantbench/tiny-v1-*/model --hardware cpu
    python benchmarks/hf_paths.py --random-shape llama-3.1-8b --tokenizer-dir <dir> --hardware h100

`--random-shape` builds a model of a real architecture with random weights (offline: nothing is downloaded);
decode speed depends on the shapes and the bytes, not on the weights' values. Its prompts are drawn from the
tokenizer given (any tokenizer: only its ids are used, and EOS cannot stop a stream early).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf

from quantbench.job import bench
from quantbench.embedded import random_shape

log = logging.getLogger("benchmarks.hf_paths")
ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "dynamic": {"cache": "dynamic", "compile": "never"},
    "static": {"cache": "static", "compile": "never"},
    "static+compile": {"cache": "static", "compile": "auto"},
}
SHAPES = random_shape.SHAPES  # config.json fields of the architectures the seed uses


def random_model(shape: str, dtype: torch.dtype, device: str, out: Path):
    """A Llama of `shape` with random weights, saved to `out` (the roofline reads the saved tensors)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape], dtype=dtype)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.save_pretrained(out)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-dir", type=Path, help="a saved model folder (with its tokenizer)")
    source.add_argument("--random-shape", choices=sorted(SHAPES), help="random weights of this architecture")
    parser.add_argument("--tokenizer-dir", type=Path, help="tokenizer for --random-shape (default: --model-dir)")
    parser.add_argument("--hardware", default="cpu", help="a conf/hardware config name (its device, dtype, bandwidth)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {list(PATHS)}")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--output-tokens", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--bnb-nf4",
        action="store_true",
        help="benchmark the model quantized on load with bitsandbytes NF4 + double quantization "
        "(method=bnb_nf4's settings), saved first so that the roofline counts its bytes",
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    if args.random_shape and not args.tokenizer_dir:
        parser.error("--random-shape needs --tokenizer-dir (any tokenizer: its ids make the prompts)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    hardware = OmegaConf.load(ROOT / "conf" / "hardware" / f"{args.hardware}.yaml")
    dtype = getattr(torch, str(hardware.dtype))
    scratch = tempfile.TemporaryDirectory(prefix="quantbench-hf-paths-")
    if args.random_shape:
        model_dir = Path(scratch.name)
        model = random_model(args.random_shape, dtype, hardware.device, model_dir)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir)
    else:
        model_dir = args.model_dir
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=hardware.device)
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_dir or model_dir)
    if args.bnb_nf4:
        from transformers import BitsAndBytesConfig

        del model
        nf4 = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map=hardware.device, quantization_config=nf4
        )
        model_dir = Path(scratch.name) / "bnb_nf4"
        model.save_pretrained(model_dir)
    device_name = torch.cuda.get_device_name() if hardware.device.startswith("cuda") else "cpu"

    rows = []
    for name in args.paths.split(","):
        cfg = OmegaConf.create(
            {
                "backend": "hf",
                "prompt_tokens": args.prompt_tokens,
                "output_tokens": args.output_tokens,
                "streams": [int(s) for s in args.streams.split(",")],
                "warmup": 1,
                "repeats": args.repeats,
                "hf": PATHS[name],
            }
        )
        plan = bench.plan(cfg)
        result = bench.run(plan, model, tokenizer, model_dir, hardware)
        m = result.metrics
        for n in plan.streams:
            label = bench.stream_label(n)
            rows.append(
                {
                    "path": name,
                    "streams": n,
                    "tokens_per_s": m[f"tokens_per_s_{label}"],
                    "min": m[f"tokens_per_s_{label}_min"],
                    "max": m[f"tokens_per_s_{label}_max"],
                    "decode_tokens_per_s": m.get(f"decode_tokens_per_s_{label}"),
                    "ttft_s": m[f"ttft_s_{label}"],
                    "roofline": m.get(f"roofline_tokens_per_s_{label}"),
                    "fraction": m.get(f"roofline_fraction_{label}"),
                    "bench_path": result.tags["bench_path"],
                }
            )

    title = f"{args.model_dir or args.random_shape}{' (bnb NF4)' if args.bnb_nf4 else ''}"
    print(
        f"\nhf backend paths on {title} ({device_name}, {hardware.dtype}, "
        f"bandwidth {hardware.memory_bandwidth_gbs or 'measured'} GB/s), {args.prompt_tokens} prompt / "
        f"{args.output_tokens} generated tokens, median of {args.repeats} [min-max]:"
    )
    print("| path | streams | tokens/s | decode tokens/s | roofline | fraction (decode-only) | TTFT s | what ran |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        decode = f"{r['decode_tokens_per_s']:.1f}" if r["decode_tokens_per_s"] else "-"
        roof = f"{r['roofline']:.0f}" if r["roofline"] else "-"
        frac = f"{r['fraction']:.2f}" if r["fraction"] else "-"
        print(
            f"| {r['path']} | {r['streams']} | {r['tokens_per_s']:.1f} [{r['min']:.1f}-{r['max']:.1f}] | {decode} | "
            f"{roof} | {frac} | {r['ttft_s']:.3f} | {r['bench_path']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
