"""AQLM 2-bit: our quantizer against round-to-nearest, the checkpoint format transformers' AQLM loader reads,
published (hub-form) checkpoints, the CPU kernel guard, and one real job on the embedded model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from quantbench import measure
from quantbench.job import calibration
from quantbench.errors import ConfigError
from quantbench.job.methods import aqlm_2bit, aqlm_quantizer as aq
from quantbench.upstream import quantizers
from quantbench.job.models import SourceModel
from conftest import CACHE, ROOT

CPU = OmegaConf.create({"name": "cpu", "device": "cpu", "dtype": "bfloat16"})
# The search settings of conf/method/aqlm_2bit.yaml, for the tiny model's 2x8.
YAML = OmegaConf.load(ROOT / "conf/method/aqlm_2bit.yaml")
SETTINGS = aq.AQSettings(
    num_codebooks=2,
    nbits_per_codebook=8,
    beam_size=YAML.beam_size,
    max_rounds=YAML.max_rounds,
    rel_tol=YAML.rel_tol,
    kmeans_iters=YAML.kmeans_iters,
    cg_iters=YAML.cg_iters,
)
# Cheap settings, for tests about the format rather than the quality.
QUICK = aq.AQSettings(
    num_codebooks=2, nbits_per_codebook=8, beam_size=1, max_rounds=1, kmeans_iters=2, cg_iters=4, finetune_epochs=0
)


@pytest.fixture(autouse=True)
def numba_started():
    """numba's thread pool starts here with its default size (as in a process where something used numba before),
    whatever test runs first: then guard_cpu_kernel leaves the environment alone in this process, and the race
    test sees a pool of several threads. Loading before numba starts is tested in a fresh process."""
    quantizers.start_numba_pool()


def tiny_texts(n: int = 32) -> list[str]:
    return calibration.texts(OmegaConf.create(dict(dataset="embedded:tiny", num_samples=n, seq_len=128, seed=0)), CACHE)


def tiny_source(tiny_root: Path) -> SourceModel:
    return SourceModel(name="tiny", reference="embedded:tiny", path_or_id=str(tiny_root / "model"))


# -- the algorithm ----------------------------------------------------------------------------------------------


def rtn(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Asymmetric min-max round-to-nearest per group of `group` input weights (float16 scale and zero each)."""
    o, i = w.shape
    g = w.reshape(o, i // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2**bits - 1)
    return (((g - lo) / scale).round().clamp(0, 2**bits - 1) * scale + lo).reshape(o, i)


@pytest.fixture(scope="module")
def layer0_inputs(tiny_root):
    """The first decoder layer of the tiny model, and the second moment H = XXᵀ/n of each linear's inputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.float32)
    batches = aq.calibration_batches(AutoTokenizer.from_pretrained(tiny_root / "model"), tiny_texts(), 128, 8)
    inputs, kwargs = aq.capture_first_layer_inputs(model, batches, torch.device("cpu"))
    layer = model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    xs: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    handles = [
        m.register_forward_pre_hook(lambda _m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1])))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        for x, kw in zip(inputs, kwargs):
            aq._run(layer, x, kw)
    for h in handles:
        h.remove()
    hs = {n: (torch.cat(v).T @ torch.cat(v)) / sum(t.shape[0] for t in v) for n, v in xs.items()}
    return {n: (m.weight.detach().float(), hs[n]) for n, m in linears.items()}


@pytest.mark.parametrize("name", ["self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj"])
def test_aq_beats_round_to_nearest_at_the_same_bits_per_weight(layer0_inputs, name):
    w, h = layer0_inputs[name]
    out_f, in_f = w.shape
    result = aq.quantize_weight(w, h, SETTINGS)
    # AQLM's stored bits per weight for this layer, codebooks and scales included (all float16)
    aq_bits = (out_f * in_f // 8 * 16 + 2 * 256 * 8 * 16 + out_f * 16) / (out_f * in_f)
    group = max(g for g in (8, 16, 32, 64, 128) if 2 + 32 / g >= aq_bits)  # RTN 2-bit gets at least as many bits
    reference = float(((w @ h) * w).sum())
    rtn_error = aq.weighted_error(w, rtn(w, 2, group), h) / reference
    assert result.rel_error == pytest.approx(aq.weighted_error(w, result.weight(), h) / reference, rel=1e-3)
    assert result.rel_error < 0.5 * rtn_error, f"AQ {result.rel_error:.4f} vs RTN 2-bit g{group} {rtn_error:.4f}"


def test_each_group_is_assigned_its_nearest_codeword_across_chunks(monkeypatch):
    """The code search's core: every 8-weight group gets the codeword at the smallest Euclidean distance, also where
    the rows are split into chunks (here 7 rows a chunk, a remainder included) to bound the temporary's memory."""
    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(250, 8, generator=g), torch.randn(1024, 8, generator=g)
    monkeypatch.setattr(aq, "CHUNK_ELEMENTS", 7 * 1024)
    found = aq.nearest(x, centers)
    best = torch.cdist(x.double(), centers.double()).min(1).values
    assert torch.allclose((x.double() - centers.double()[found]).norm(dim=1), best, atol=1e-6)


def test_every_step_of_the_search_lowers_the_weighted_error(layer0_inputs):
    w, h = layer0_inputs["self_attn.q_proj"]
    g = torch.Generator().manual_seed(0)
    scales = w.norm(dim=1) / w.shape[1] ** 0.5
    books, codes = aq.residual_kmeans((w / scales[:, None]).reshape(-1, 8), 2, 256, 4, g)
    codes = codes.reshape(w.shape[0], -1, 2)
    errors = [aq.weighted_error(w, scales[:, None] * aq.decode(codes, books), h)]
    for _ in range(2):
        codes = aq.beam_search(w, h, codes, books, scales, beam_size=4)
        errors.append(aq.weighted_error(w, scales[:, None] * aq.decode(codes, books), h))
        books = aq.update_codebooks(w, h, codes, books, scales, iters=16)
        errors.append(aq.weighted_error(w, scales[:, None] * aq.decode(codes, books), h))
        scales = aq.update_scales(w, h, codes, books, scales)
        errors.append(aq.weighted_error(w, scales[:, None] * aq.decode(codes, books), h))
    assert all(b <= a * (1 + 1e-5) for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.3 * errors[0]


@pytest.mark.parametrize("num_codebooks, nbits", [(2, 8), (1, 16)])
def test_our_tensors_are_what_aqlm_computes_with(num_codebooks, nbits):
    """Packing (int8 / int16, codes >= 2^(B-1) stored as code - 2^B), layouts, and W[o, 8j+b] = scales[o] *
    sum_c codebooks[c, codes[o, j, c], 0, b], checked through aqlm's own layer on CPU (numba kernel for 8-bit
    codebooks, aqlm's dequantization for 16-bit)."""
    from aqlm import QuantizedLinear
    from aqlm.utils import pack_int_data

    g = torch.Generator().manual_seed(nbits)
    k = 2**nbits
    codes = torch.randint(k, (32, 8, num_codebooks), generator=g)
    packed = aq.pack_codes(codes, nbits)
    assert packed.dtype == (torch.int8 if nbits == 8 else torch.int16)
    assert torch.equal(packed, pack_int_data(codes.clone(), nbits)) and torch.equal(
        aq.unpack_codes(packed, nbits), codes
    )
    result = aq.AQResult(
        codes=codes,
        codebooks=torch.randn(num_codebooks, k, 8, generator=g),
        scales=torch.rand(32, generator=g),
        rel_error=0.0,
    )
    ours = aq.AQLinear(result, None)
    w = ours.weight()
    o, j, b = 3, 2, 5
    assert w[o, 8 * j + b] == pytest.approx(
        float(result.scales[o] * sum(result.codebooks[c, codes[o, j, c], b] for c in range(num_codebooks))), rel=1e-5
    )

    theirs = QuantizedLinear(
        64, 32, in_group_size=8, out_group_size=1, num_codebooks=num_codebooks, nbits_per_codebook=nbits, bias=False
    )
    tensors = ours.aqlm_tensors(torch.float32, nbits)
    assert {n: t.shape for n, t in tensors.items()} == {n: t.shape for n, t in theirs.state_dict().items()}
    theirs.load_state_dict(tensors)
    quantizers.guard_cpu_kernel(theirs)
    x = torch.randn(4, 64, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-4)


# -- configuration ------------------------------------------------------------------------------------------------


def test_auto_codebooks_are_the_seeds_1x16_on_llama_8b_and_2x8_on_the_tiny_model(tiny_root):
    from transformers import AutoConfig, LlamaConfig

    from quantbench.embedded.random_shape import SHAPES

    llama_8b = LlamaConfig(**SHAPES["llama-3.1-8b"])  # Meta's published config
    shapes_8b = measure.linear_shapes_of_config(llama_8b)
    assert aqlm_2bit.choose_shape("auto", shapes_8b) == (1, 16)
    assert aqlm_2bit.codebook_bits_per_weight((1, 16), shapes_8b) == pytest.approx(0.27, abs=0.01)
    tiny = measure.linear_shapes_of_config(AutoConfig.from_pretrained(tiny_root / "model"))
    assert aqlm_2bit.choose_shape("auto", tiny) == (2, 8)
    assert aqlm_2bit.codebook_bits_per_weight((1, 16), tiny) > 60  # 1x16's codebooks dwarf the tiny layers
    assert aqlm_2bit.choose_shape("1x16", tiny) == (1, 16)  # an explicit shape is obeyed
    for bad in ("3", "2x17", "0x8", "big"):
        with pytest.raises(ConfigError, match="method.codebooks"):
            aqlm_2bit.choose_shape(bad, tiny)


def test_pretrained_references_fail_fast_with_a_reason(tiny_root, tmp_path, monkeypatch):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_root / "model")
    with pytest.raises(ConfigError, match="no AQLM checkpoint there"):
        aqlm_2bit.AQLM2Bit("aqlm_2bit", pretrained=str(tmp_path / "missing")).validate(config, CPU)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the local Hugging Face cache"):
        aqlm_2bit.AQLM2Bit("aqlm_2bit", pretrained="ISTA-DASLab/no-such-model-AQLM-2Bit-1x16-hf").validate(config, CPU)
    with pytest.raises(ConfigError, match="not an AQLM checkpoint"):
        aqlm_2bit.AQLM2Bit("aqlm_2bit", pretrained=str(tiny_root / "model")).validate(config, CPU)
    other = tmp_path / "other"
    other.mkdir()
    wrong = config.to_dict() | {"hidden_size": 512, "quantization_config": aq.quantization_config(QUICK)}
    (other / "config.json").write_text(json.dumps(wrong))
    with pytest.raises(ConfigError, match="hidden_size: 512 vs 256"):
        aqlm_2bit.AQLM2Bit("aqlm_2bit", pretrained=str(other)).validate(config, CPU)


def test_only_the_builtin_quantizer_asks_for_calibration():
    assert aqlm_2bit.AQLM2Bit("aqlm_2bit").needs_calibration
    assert not aqlm_2bit.AQLM2Bit("aqlm_2bit", pretrained="/some/folder").needs_calibration


# -- the CPU kernel guard ------------------------------------------------------------------------------------------


def _random_2x8_layer(seed: int):
    """An aqlm 2x8 layer (256 x 768, the tiny model's down_proj) and its weight dequantized by aqlm's reference code."""
    from aqlm import QuantizedLinear
    from aqlm.utils import _dequantize_weight, unpack_int_data

    g = torch.Generator().manual_seed(seed)
    layer = QuantizedLinear(
        768, 256, in_group_size=8, out_group_size=1, num_codebooks=2, nbits_per_codebook=8, bias=False
    )
    layer.codes.data = torch.randint(-128, 128, (256, 96, 2), dtype=torch.int8, generator=g)
    layer.codebooks.data = torch.randn(2, 256, 1, 8, generator=g)
    layer.scales.data = torch.rand(256, 1, 1, 1, generator=g)
    return layer, _dequantize_weight(unpack_int_data(layer.codes.data, 8), layer.codebooks.data, layer.scales.data)


GUARDED_KERNEL = """
import os, sys, torch, numba
batch = int(sys.argv[1])
sys.path[:0] = sys.argv[2:]  # this module, and conftest beside the tests
from test_aqlm_2bit import _random_2x8_layer
from quantbench.upstream import quantizers
layer, weight = _random_2x8_layer(batch)
model = torch.nn.Sequential(layer)
threads = numba.get_num_threads()  # numba's pool runs, with NUMBA_NUM_THREADS threads
assert quantizers.guard_cpu_kernel(model) == 1
assert os.environ["NUMBA_NUM_THREADS"] == "2"  # numba is running: changing it now would make numba raise
x = torch.randn(batch, 16, 768, generator=torch.Generator().manual_seed(batch))
with torch.no_grad():
    reference = x @ weight.T
    errors = [float((model(x) - reference).norm() / reference.norm()) for _ in range(3)]  # a race varies run to run
print("RESULT", threads, numba.get_num_threads(), max(errors))
"""


@pytest.mark.parametrize("batch", [2, 8, 32])
def test_the_guarded_8bit_codebook_cpu_kernel_matches_the_dequantized_weight(batch):
    """aqlm 1.1.7's numba kernel races with > 1 numba thread; behind the guard it must be exact at any batch size,
    here through the hooks alone, in a fresh process whose numba already runs a pool of two threads (this process's
    numba may run one: an earlier test's guard pins it for the processes it starts, and pytest's worker is one)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    paths = [str(Path(__file__).parent), str(ROOT / "tests")]
    out = subprocess.run([sys.executable, "-c", GUARDED_KERNEL, str(batch), *paths],
                         capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    _, pool, after, error = next(line for line in out.stdout.splitlines() if line.startswith("RESULT")).split()
    assert pool == "2" and after == "2"  # the pool ran two threads, and the guard restored them after each forward
    assert float(error) < 1e-5


def test_the_guard_pins_numba_to_one_thread_in_child_processes(tmp_path):
    """Loaded before numba starts (as in a job), the guard sets NUMBA_NUM_THREADS=1 for the processes it starts
    (the artifact check reloads the model in one); numba in this process then runs one thread too, and torch
    keeps its own thread count."""
    script = (
        "import os, sys, torch\n"
        "threads = torch.get_num_threads()\n"
        "from quantbench.upstream import quantizers\n"
        "from aqlm import QuantizedLinear\n"
        "from aqlm.utils import _dequantize_weight, unpack_int_data\n"
        "layer = QuantizedLinear(768, 256, 8, 1, 2, 8, bias=False)\n"
        "layer.codes.data = torch.randint(-128, 128, (256, 96, 2), dtype=torch.int8)\n"
        "layer.codebooks.data = torch.randn(2, 256, 1, 8); layer.scales.data = torch.rand(256, 1, 1, 1)\n"
        "weight = _dequantize_weight(unpack_int_data(layer.codes.data, 8), layer.codebooks.data, layer.scales.data)\n"
        "assert 'numba' not in sys.modules\n"
        "assert quantizers.guard_cpu_kernel(torch.nn.Sequential(layer)) == 1\n"
        "x = torch.randn(8, 16, 768)\n"
        "with torch.no_grad():\n"
        "    ref = x @ weight.T; err = float((layer(x) - ref).norm() / ref.norm())\n"
        "import numba\n"
        "print('RESULT', os.environ['NUMBA_NUM_THREADS'], numba.config.NUMBA_NUM_THREADS, torch.get_num_threads() == threads, err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS")}  # defaults
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    _, child_env, pool, torch_kept, err = next(
        line for line in out.stdout.splitlines() if line.startswith("RESULT")
    ).split()
    assert child_env == "1" and pool == "1" and float(err) < 1e-5
    assert torch_kept == "True"  # numba's OpenMP pool would have set torch to one thread too


def test_fix_not_to_quantize_adds_module_names_beside_weight_names():
    hub = {"quant_method": "aqlm", "linear_weights_not_to_quantize": ["model.embed_tokens.weight", "lm_head.weight"]}
    fixed = quantizers.fix_not_to_quantize(hub)
    assert fixed["linear_weights_not_to_quantize"] == [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.embed_tokens",
        "lm_head",
    ]
    assert quantizers.fix_not_to_quantize(fixed) == fixed
    assert hub["linear_weights_not_to_quantize"] == ["model.embed_tokens.weight", "lm_head.weight"]  # not mutated


# -- checkpoints: ours, the hub's form, resuming ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_checkpoint(tiny_root, tmp_path_factory) -> Path:
    """The tiny model through our quantizer with cheap settings, written by write_checkpoint (work folder kept)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("aqlm_quick")
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(tiny_root / "model")
    aq.quantize_model(model, tokenizer, tiny_texts(16), QUICK, 64, "cpu", root / "work", "tiny")
    aq.write_checkpoint(model, QUICK, root / "model", weights_dtype=torch.bfloat16)
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def test_our_checkpoint_loads_through_transformers_aqlm_path_with_no_missing_or_unexpected_keys(
    quick_checkpoint, tiny_root
):
    from aqlm import QuantizedLinear
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads((quick_checkpoint / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "aqlm",
        "in_group_size": 8,
        "out_group_size": 1,
        "num_codebooks": 2,
        "nbits_per_codebook": 8,
        "linear_weights_not_to_quantize": ["lm_head"],
    }
    index = measure.safetensors_index(quick_checkpoint)
    assert index["model.layers.0.mlp.down_proj.codes"][:2] == ("I8", [256, 96, 2])
    assert index["model.layers.0.mlp.down_proj.codebooks"][:2] == ("F16", [2, 256, 1, 8])
    assert index["model.layers.0.mlp.down_proj.scales"][:2] == ("F16", [256, 1, 1, 1])
    assert "model.layers.0.mlp.down_proj.weight" not in index and index["lm_head.weight"][0] == "BF16"

    model, info = AutoModelForCausalLM.from_pretrained(quick_checkpoint, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    shapes = measure.linear_shapes_of_config(AutoConfig.from_pretrained(tiny_root / "model"))
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n], QuantizedLinear) for n in shapes)
    assert type(model.lm_head) is torch.nn.Linear


def test_bits_per_weight_with_and_without_codebooks(quick_checkpoint, tiny_root):
    from transformers import AutoConfig

    shapes = measure.linear_shapes_of_config(AutoConfig.from_pretrained(tiny_root / "model"))
    parts = aqlm_2bit.bits_per_weight_parts(quick_checkpoint, shapes)
    n = sum(o * i for o, i in shapes.values())
    assert parts["codes"] == pytest.approx(2.0)
    assert parts["scales"] == pytest.approx(16 * sum(o for o, _ in shapes.values()) / n)
    assert parts["without_codebooks"] == pytest.approx(2.053, abs=0.001)  # the figure in conf/method/aqlm_2bit.yaml
    assert parts["codebooks"] == pytest.approx(aqlm_2bit.codebook_bits_per_weight((2, 8), shapes))
    assert parts["total"] == pytest.approx(measure.bits_per_weight(quick_checkpoint, shapes))  # what the pipeline logs
    assert parts["other"] == 0


def _hub_form(ours: Path, dest: Path) -> Path:
    """Our checkpoint laid out as the ISTA-DASLab *-hf repos are: weight names in the skip list, float16 config."""
    shutil.copytree(ours, dest)
    config = json.loads((dest / "config.json").read_text())
    config["quantization_config"]["linear_weights_not_to_quantize"] = ["model.embed_tokens.weight", "lm_head.weight"]
    config.pop("dtype", None)
    config["torch_dtype"] = "float16"
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def test_a_hub_form_checkpoint_loads_and_generates(quick_checkpoint, tiny_root, tmp_path):
    from aqlm import QuantizedLinear
    from transformers import AutoModelForCausalLM

    hub = _hub_form(quick_checkpoint, tmp_path / "ISTA-DASLab--tiny-AQLM-2Bit-2x8-hf")
    # The upstream defect this works around: plain transformers turns lm_head into an empty AQLM layer.
    # When this assertion fails, transformers has fixed it and fix_not_to_quantize can go.
    plain = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32)
    assert isinstance(plain.lm_head, QuantizedLinear)
    del plain

    method = aqlm_2bit.AQLM2Bit("aqlm_2bit", pretrained=str(hub))
    source = tiny_source(tiny_root)
    method.validate(source.config(), CPU)
    assert not method.needs_calibration and method.quant_format == "aqlm-2x8"
    model = method.quantize(source, tmp_path / "out", CPU)
    assert type(model.lm_head) is torch.nn.Linear and model.dtype == torch.float32
    assert (
        "lm_head"
        in json.loads((tmp_path / "out/config.json").read_text())["quantization_config"][
            "linear_weights_not_to_quantize"
        ]
    )  # the copied artifact reloads correctly with plain transformers too
    tokenizer = source.tokenizer()
    ids = tokenizer("Q: What is 2 plus 3? A:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3


def test_an_interrupted_quantization_resumes_after_the_last_finished_layer(
    quick_checkpoint, tiny_root, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = quick_checkpoint.parent / "work"
    assert sorted(p.name for p in work.glob("layer_*.pt")) == [f"layer_{i:03d}.pt" for i in range(4)]
    (work / "layer_003.pt").unlink()  # as if the job had stopped during the last layer
    calls = []
    real = aq.quantize_weight
    monkeypatch.setattr(aq, "quantize_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = AutoModelForCausalLM.from_pretrained(tiny_root / "model", dtype=torch.bfloat16)
    aq.quantize_model(
        model, AutoTokenizer.from_pretrained(tiny_root / "model"), tiny_texts(16), QUICK, 64, "cpu", work, "tiny"
    )
    assert len(calls) == 7  # only the last layer's linears were quantized again
    aq.write_checkpoint(model, QUICK, tmp_path / "resumed", weights_dtype=torch.bfloat16)
    from safetensors.torch import load_file

    first, resumed = (
        load_file(quick_checkpoint / "model.safetensors"),
        load_file(tmp_path / "resumed/model.safetensors"),
    )
    assert first.keys() == resumed.keys()
    for k in first:
        torch.testing.assert_close(first[k], resumed[k], msg=k)


# -- one real job ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aqlm_job(default_sweep):
    """The default sweep (`python run.py -m`, shared with tests/e2e/test_default_sweep.py): AQLM and the 4-bit reference,
    bnb_nf4, side by side."""
    return {r.data.tags["method"]: r for r in default_sweep.runs()}, default_sweep


@pytest.mark.e2e
def test_the_aqlm_job_finishes_with_sizes_accuracy_and_speed(aqlm_job):
    runs, _ = aqlm_job
    aqlm, nf4 = runs["aqlm_2bit"], runs["bnb_nf4"]
    assert aqlm.info.status == "FINISHED"
    m, tags = aqlm.data.metrics, aqlm.data.tags
    assert tags["quant_format"] == "aqlm-2x8" and tags["quant_library"] == "aqlm"
    assert "aqlm.inference.QuantizedLinear x28" in tags["eval_kernel"]
    assert tags["artifact_verified"] == "true"  # reloaded in a fresh process, it behaves like the model scored
    assert 2.5 < m["bits_per_weight"] < 2.7  # 2.05 without codebooks (test_bits_per_weight_with_and_without_codebooks)
    assert m["weight_gb"] < nf4.data.metrics["weight_gb"]
    assert m["quantize_s"] < 600  # ~1 minute of CPU on 2 idle cores; loose because test machines are shared
    assert m["tokens_per_s_1_stream"] > 0 and m["tokens_per_s_8_streams"] > 0
    # Above chance (4 choices), and at or below NF4: on average over the two tasks, and per task up to sampling
    # noise (seen: facts 0.990 vs 0.997, arith 0.940 vs 0.953).
    tasks = ("tiny_facts_acc", "tiny_arith_acc")
    for task in tasks:
        assert 0.25 < m[task] <= nf4.data.metrics[task] + 2 * m[f"{task}_stderr"], task
    assert sum(m[t] for t in tasks) <= sum(nf4.data.metrics[t] for t in tasks)


@pytest.mark.e2e
def test_the_aqlm_artifact_reloads_and_generates_with_plain_transformers(aqlm_job, tmp_path):
    from quantbench.tracking import logged_model

    runs, store = aqlm_job
    model = logged_model.of_run(store.client, runs["aqlm_2bit"].info.run_id)  # the run's logged model
    local = str(logged_model.download(model, tmp_path, store.uri))
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "assert m.dtype == torch.float32, m.dtype\n"
        "ids = t('Q: Where does Wren Gray live? A:', return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=2, do_sample=False)\n"
        "print('GENERATED', t.decode(out[0, ids.shape[1]:]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, local],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NUMBA_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GENERATED" in out.stdout
