"""Additive Quantization of Language Models, our own implementation of the paper's algorithm.

Egiazarian et al., "Extreme Compression of Large Language Models via Additive Quantization" (ICML 2024). No pip
package quantizes with AQLM (the `aqlm` distribution only runs AQLM models), so this module does it:

* layer by layer: calibration activations run through the model sequentially, and each decoder layer's linears
  are quantized on the inputs produced by the already-quantized layers before it;
* each weight row is split into groups of `in_group_size` (8) input dimensions; a group is the sum of one
  codeword from each of M codebooks of 2^B codewords, times a per-output-channel scale;
* the objective is the calibration-weighted error ||WX - ŴX||² = tr((W - Ŵ) H (W - Ŵ)ᵀ), H = XXᵀ / n;
* alternating, until the error stops improving: codes by beam search (one input group at a time, the other
  groups' errors folded in through H), codebooks by conjugate gradients on the (quadratic) objective, scales in
  closed form. Every step can only lower the objective.
* then, optionally, codebooks and scales of the whole decoder layer are fine-tuned with Adam against the
  unquantized layer's output.

The result is written in exactly the checkpoint format transformers' AQLM loader reads (see `write_checkpoint`).
A long job resumes per decoder layer: each finished layer is a file in `work_dir`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

CHUNK_ELEMENTS = 2**24  # largest temporary (rows x candidates) a step materialises, to bound memory
# On a GPU a chunk of 2**24 distances to 65,536 codewords is 256 rows: an 8B-shaped layer then takes ~100k chunks
# of a few small kernels each, and kernel launches, not arithmetic, set the time (13.5 s a layer on an H200,
# benchmarks/results/2026-12-01-h200x2). 2**27 (512 MiB) makes 8x fewer chunks.
CHUNK_ELEMENTS_CUDA = 2**27


@dataclass(frozen=True)
class AQSettings:
    """How hard to search. Defaults suit the embedded tiny model (minutes on 2 CPU cores)."""

    num_codebooks: int = 1
    nbits_per_codebook: int = 16
    in_group_size: int = 8
    beam_size: int = 8
    max_rounds: int = 6  # (beam search, codebook update, scale update) rounds per linear layer
    rel_tol: float = 0.005  # stop a linear's rounds when one improves its error by less than this fraction
    kmeans_iters: int = 16
    cg_iters: int = 16
    finetune_epochs: int = 4  # 0 = no fine-tuning of the decoder layer against its unquantized output
    finetune_lr: float = 1e-4
    batch_size: int = 8  # calibration sequences per forward pass
    seed: int = 0

    @property
    def codebook_size(self) -> int:
        return 2**self.nbits_per_codebook


# ---------------------------------------------------------------------------------------------------------------
# One weight matrix
# ---------------------------------------------------------------------------------------------------------------


def decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """codes [out, groups, M] (int64), codebooks [M, K, g] -> the unscaled weight [out, groups * g]."""
    out = codebooks[0][codes[..., 0]]
    for c in range(1, codes.shape[-1]):
        out = out + codebooks[c][codes[..., c]]
    return out.reshape(codes.shape[0], -1)


def decode_adjoint(grad: torch.Tensor, codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """The transpose of `decode`: scatter-add a [out, in] matrix into [M, K, g] codebook slots."""
    n_out, groups, m = codes.shape
    g = grad.shape[1] // groups
    flat = grad.reshape(n_out * groups, g)
    out = grad.new_zeros(m, codebook_size, g)
    for c in range(m):
        out[c].index_add_(0, codes[..., c].reshape(-1), flat)
    return out


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr((W - Ŵ) H (W - Ŵ)ᵀ): the mean squared output error of the layer on the calibration inputs."""
    d = w - w_hat
    return float(((d @ h) * d).sum())


@dataclass
class AQResult:
    codes: torch.Tensor  # [out, in / g, M] int64 in [0, K)
    codebooks: torch.Tensor  # [M, K, g] float32
    scales: torch.Tensor  # [out] float32
    rel_error: float  # weighted_error / tr(W H Wᵀ)

    def weight(self) -> torch.Tensor:
        return self.scales[:, None] * decode(self.codes, self.codebooks)


def quantize_weight(
    w: torch.Tensor, h: torch.Tensor, s: AQSettings, generator: torch.Generator | None = None
) -> AQResult:
    """Additive quantization of one weight matrix w [out, in] under the input second moment h [in, in]."""
    w, h = w.float(), h.float()
    n_out, n_in = w.shape
    g, m, k = s.in_group_size, s.num_codebooks, s.codebook_size
    if n_in % g:
        raise ValueError(f"in_features={n_in} is not a multiple of the group size {g}")
    generator = generator or torch.Generator(device=w.device).manual_seed(s.seed)

    scales = (w.norm(dim=1) / math.sqrt(n_in)).clamp_min(1e-8)
    codebooks, codes = residual_kmeans((w / scales[:, None]).reshape(-1, g), m, k, s.kmeans_iters, generator)
    codes = codes.reshape(n_out, n_in // g, m)
    scales = update_scales(w, h, codes, codebooks, scales)

    reference = max(float(((w @ h) * w).sum()), 1e-30)
    error = weighted_error(w, scales[:, None] * decode(codes, codebooks), h)
    for _ in range(s.max_rounds):
        codes = beam_search(w, h, codes, codebooks, scales, s.beam_size)
        codebooks = update_codebooks(w, h, codes, codebooks, scales, s.cg_iters)
        scales = update_scales(w, h, codes, codebooks, scales)
        new_error = weighted_error(w, scales[:, None] * decode(codes, codebooks), h)
        improved = error - new_error
        error = new_error
        if improved < s.rel_tol * error:
            break
    return AQResult(codes=codes, codebooks=codebooks, scales=scales, rel_error=error / reference)


def residual_kmeans(
    x: torch.Tensor, m: int, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's initialisation: codebook c is k-means on what codebooks 0..c-1 leave unexplained."""
    residual = x.clone()
    books, codes = [], []
    for _ in range(m):
        centers, assign = kmeans(residual, k, iters, generator)
        residual -= centers[assign]
        books.append(centers)
        codes.append(assign)
    return torch.stack(books), torch.stack(codes, dim=-1)


def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm from k random points; empty clusters are re-seeded with random points."""
    n = x.shape[0]
    pick = (
        torch.randperm(n, generator=generator, device=x.device)[:k]
        if n >= k
        else torch.randint(n, (k,), generator=generator, device=x.device)
    )
    centers = x[pick].clone()
    for _ in range(iters):
        assign = nearest(x, centers)
        sums = torch.zeros_like(centers).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centers = torch.where(empty[:, None], centers, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            centers[empty] = x[torch.randint(n, (int(empty.sum()),), generator=generator, device=x.device)]
    return centers, nearest(x, centers)


def nearest(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Each row's nearest center: argmin over centers of |c|² - 2 x·c (|x|² is the same for all), in one fused
    matrix product per chunk of rows (1.7x faster than separate ops on the CPU, same indices)."""
    c2 = (centers * centers).sum(1)
    step = max(1, (CHUNK_ELEMENTS_CUDA if x.is_cuda else CHUNK_ELEMENTS) // centers.shape[0])
    return torch.cat(
        [torch.addmm(c2, x[i : i + step], centers.T, alpha=-2).argmin(1) for i in range(0, x.shape[0], step)]
    )


@torch.no_grad()
def beam_search(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, beam_size: int
) -> torch.Tensor:
    """New codes, one input group at a time (all output rows at once), each chosen by beam search over the M codebooks.

    For group j of row o with the other groups fixed, the error as a function of the group's reconstruction v is
    vᵀ H_jj v - 2 vᵀ t + const, where t = (R H)_j + H_jj ŵ_j folds in the other groups' residuals R = W - Ŵ. The
    current codes are always among the candidates, so the error never increases.
    """
    codes = codes.clone()
    n_out, groups, m = codes.shape
    g = codebooks.shape[-1]
    w_hat = scales[:, None] * decode(codes, codebooks)
    rh = (w - w_hat) @ h
    for j in range(groups):
        sl = slice(j * g, (j + 1) * g)
        h_jj = h[sl, sl]
        target = rh[:, sl] + w_hat[:, sl] @ h_jj
        new = _beam_group(target, h_jj, codebooks, codes[:, j, :], scales, beam_size)
        v = scales[:, None] * sum(codebooks[c][new[:, c]] for c in range(m))
        rh += (w_hat[:, sl] - v) @ h[sl, :]
        w_hat[:, sl] = v
        codes[:, j, :] = new
    return codes


def _beam_group(
    target: torch.Tensor,
    h_jj: torch.Tensor,
    codebooks: torch.Tensor,
    current: torch.Tensor,
    scales: torch.Tensor,
    beam_size: int,
) -> torch.Tensor:
    """Codes [out, M] for one group minimising s²·dᵀH d - 2s·dᵀt, d = sum of the chosen codewords (beam search)."""
    m, k, _ = codebooks.shape
    ch = codebooks @ h_jj  # [M, K, g]
    quad = (ch * codebooks).sum(-1)  # [M, K]: CₖᵀH Cₖ
    out = torch.empty_like(current)
    rows = max(1, CHUNK_ELEMENTS // ((beam_size if m > 1 else 1) * k))
    for r0 in range(0, current.shape[0], rows):
        r = slice(r0, r0 + rows)
        s = scales[r][:, None, None]
        hyp = current[r][:, None, :]  # [rows, beams, M]
        for c in range(m):
            others = sum(
                (codebooks[c2][hyp[..., c2]] for c2 in range(m) if c2 != c),
                torch.zeros(*hyp.shape[:2], codebooks.shape[-1], dtype=codebooks.dtype, device=codebooks.device),
            )
            oh = others @ h_jj  # [rows, beams, g]
            cost = s * s * ((oh * others).sum(-1, keepdim=True) + 2 * oh @ codebooks[c].T + quad[c]) - 2 * s * (
                (others * target[r][:, None, :]).sum(-1, keepdim=True) + (target[r] @ codebooks[c].T)[:, None, :]
            )
            flat = cost.reshape(cost.shape[0], -1)
            best = flat.topk(min(beam_size, flat.shape[1]), dim=1, largest=False).indices  # sorted, best first
            hyp = torch.gather(hyp, 1, (best // k)[..., None].expand(-1, -1, m)).clone()
            hyp[..., c] = best % k
        out[r] = hyp[:, 0]
    return out


@torch.no_grad()
def update_codebooks(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, iters: int
) -> torch.Tensor:
    """Codebooks minimising the weighted error for fixed codes and scales: conjugate gradients on the normal
    equations Aθ = b, A θ = Dᵀ(s² · D(θ) H), b = Dᵀ(s · W H), D = decode. Kept only if the error went down."""
    k = codebooks.shape[1]
    s2 = (scales * scales)[:, None]

    def a(theta: torch.Tensor) -> torch.Tensor:
        return decode_adjoint(s2 * (decode(codes, theta) @ h), codes, k)

    b = decode_adjoint(scales[:, None] * (w @ h), codes, k)
    x = codebooks.clone()
    r = b - a(x)
    p = r.clone()
    rs = float((r * r).sum())
    stop = 1e-12 * float((b * b).sum())
    for _ in range(iters):
        if rs <= stop:
            break
        ap = a(p)
        denom = float((p * ap).sum())
        if denom <= 0:
            break
        alpha = rs / denom
        x += alpha * p
        r -= alpha * ap
        rs_new = float((r * r).sum())
        p = r + (rs_new / rs) * p
        rs = rs_new
    before = weighted_error(w, scales[:, None] * decode(codes, codebooks), h)
    after = weighted_error(w, scales[:, None] * decode(codes, x), h)
    return x if after <= before else codebooks


@torch.no_grad()
def update_scales(
    w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Per-row least squares: s_o = uᵀHw / uᵀHu with u the row's unscaled reconstruction."""
    u = decode(codes, codebooks)
    uh = u @ h
    num, den = (uh * w).sum(1), (uh * u).sum(1)
    return torch.where(den > 0, num / den.clamp_min(1e-30), scales)


# ---------------------------------------------------------------------------------------------------------------
# A quantized linear layer (differentiable in codebooks and scales) and its AQLM tensors
# ---------------------------------------------------------------------------------------------------------------


class AQLinear(nn.Module):
    """A linear layer held as AQLM holds it. Forward dequantizes (what aqlm's kernels compute, up to rounding)
    so that the decoder layer can be fine-tuned and the next layer gets the quantized layer's outputs."""

    def __init__(self, result: AQResult, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("codes", result.codes)
        self.codebooks = nn.Parameter(result.codebooks.clone(), requires_grad=False)
        self.scales = nn.Parameter(result.scales.clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def weight(self) -> torch.Tensor:
        return self.scales[:, None] * decode(self.codes, self.codebooks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def aqlm_tensors(self, float_dtype: torch.dtype, nbits: int) -> dict[str, torch.Tensor]:
        """codes [out, in/g, M] (signed: codes >= 2^(B-1) stored as code - 2^B), codebooks [M, K, 1, g], scales [out, 1, 1, 1]."""
        m, k, g = self.codebooks.shape
        out = {
            "codes": pack_codes(self.codes, nbits),
            "codebooks": self.codebooks.detach().reshape(m, k, 1, g).to(float_dtype).contiguous(),
            "scales": self.scales.detach().reshape(-1, 1, 1, 1).to(float_dtype).contiguous(),
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach().to(float_dtype).contiguous()
        return out

    @classmethod
    def from_aqlm_tensors(cls, t: dict[str, torch.Tensor], nbits: int) -> "AQLinear":
        m, k, _, g = t["codebooks"].shape
        result = AQResult(
            codes=unpack_codes(t["codes"], nbits),
            codebooks=t["codebooks"].float().reshape(m, k, g),
            scales=t["scales"].float().reshape(-1),
            rel_error=float("nan"),
        )
        return cls(result, t.get("bias"))


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """aqlm's storage: int8 for B <= 8, int16 for B <= 16; codes >= 2^(B-1) become code - 2^B."""
    dtype = torch.int8 if nbits <= 8 else torch.int16 if nbits <= 16 else torch.int32
    c = codes.to(torch.int64)
    return torch.where(c >= 2 ** (nbits - 1), c - 2**nbits, c).to(dtype).contiguous()


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    return codes.to(torch.int64) % (2**nbits)


# ---------------------------------------------------------------------------------------------------------------
# The whole model, layer by layer
# ---------------------------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the hook on the first decoder layer once it has its inputs: nothing after it needs to run."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__} has no decoder.layers; the AQLM quantizer handles Llama-family models."
        )
    return layers


def calibration_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int) -> list[torch.Tensor]:
    """Token ids [batch, T]: every text truncated to seq_len, then all cut to the shortest so batches stack."""
    ids = [tokenizer(t, truncation=True, max_length=seq_len)["input_ids"] for t in texts]
    ids = [x for x in ids if len(x) >= 2]
    if not ids:
        raise ValueError("no calibration text is at least 2 tokens long")
    length = min(len(x) for x in ids)
    if length < seq_len:
        log.warning(
            "Calibration: the shortest text has %d tokens; every sample is cut to %d (seq_len=%d)",
            length,
            length,
            seq_len,
        )
    rows = torch.tensor([x[:length] for x in ids])
    return list(rows.split(batch_size))


def fingerprint(**parts) -> str:
    """What a finished layer file depends on: resuming with different inputs or settings must start over."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device):
    """Hidden states and keyword arguments (rotary embeddings, masks) that the first decoder layer receives."""
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    kwargs: list[dict] = []

    def hook(_module, args, kw):
        hidden = args[0] if args else kw.pop("hidden_states")
        inputs.append(hidden.detach().to(device, torch.float32))
        kwargs.append(_to(kw, device))
        raise _Captured

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(model.device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, torch.float32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _run(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


def quantize_model(
    model: nn.Module,
    tokenizer,
    texts: list[str],
    s: AQSettings,
    seq_len: int,
    device: str | torch.device,
    work_dir: Path,
    source_id: str,
) -> dict[str, float]:
    """Replace every nn.Linear inside the decoder layers by an AQLinear, in place; return each one's relative error.

    Finished layers are saved to `work_dir/layer_XXX.pt`; a rerun with the same inputs and settings loads them
    instead of quantizing again, so an interrupted run on a large model resumes where it stopped.
    """
    device = torch.device(device)
    batches = calibration_batches(tokenizer, texts, seq_len, s.batch_size)
    key = fingerprint(
        source=source_id,
        settings=asdict(s),
        seq_len=seq_len,
        texts=hashlib.sha256("\x00".join(texts).encode()).hexdigest(),
    )
    _prepare_work_dir(work_dir, key)

    layers = decoder_layers(model)
    inputs, kwargs = capture_first_layer_inputs(model, batches, device)
    errors: dict[str, float] = {}
    for i, layer in enumerate(layers):
        prefix = _prefix(model, layer)
        path = work_dir / f"layer_{i:03d}.pt"
        layer.to(device, torch.float32)
        if path.exists():
            saved = torch.load(path, map_location=device, weights_only=True)
            for name, tensors in saved["linears"].items():
                layer.set_submodule(name, AQLinear.from_aqlm_tensors(tensors, s.nbits_per_codebook).to(device))
            errors.update({f"{prefix}.{n}": e for n, e in saved["errors"].items()})
            log.info("AQLM layer %d/%d: resumed from %s", i + 1, len(layers), path)
        else:
            # One generator per layer: a resumed run draws the same random numbers as an uninterrupted one.
            generator = torch.Generator(device=device).manual_seed(s.seed * 100_003 + i)
            layer_errors = _quantize_layer(layer, inputs, kwargs, s, generator, f"AQLM layer {i + 1}/{len(layers)}")
            errors.update({f"{prefix}.{n}": e for n, e in layer_errors.items()})
            linears = {
                n: m.aqlm_tensors(torch.float32, s.nbits_per_codebook)
                for n, m in layer.named_modules()
                if isinstance(m, AQLinear)
            }
            tmp = path.with_suffix(".tmp")
            torch.save(
                {
                    "linears": {n: {k: v.cpu() for k, v in t.items()} for n, t in linears.items()},
                    "errors": layer_errors,
                },
                tmp,
            )
            os.replace(tmp, path)
        with torch.no_grad():
            inputs = [_run(layer, x, kw) for x, kw in zip(inputs, kwargs)]
        layer.to("cpu")
    return errors


def _prefix(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def _prepare_work_dir(work_dir: Path, key: str) -> None:
    meta = work_dir / "meta.json"
    if meta.exists() and json.loads(meta.read_text()).get("fingerprint") != key:
        log.warning(
            "AQLM work folder %s holds layers of a different job (inputs or settings changed): starting over", work_dir
        )
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    if not meta.exists():
        meta.write_text(json.dumps({"fingerprint": key}))
    done = sorted(work_dir.glob("layer_*.pt"))
    if done:
        log.info("AQLM: resuming, %d finished layer(s) in %s", len(done), work_dir)


def _quantize_layer(
    layer: nn.Module,
    inputs: list[torch.Tensor],
    kwargs: list[dict],
    s: AQSettings,
    generator: torch.Generator,
    desc: str,
) -> dict[str, float]:
    """Quantize one decoder layer's linears on its (quantized-prefix) inputs, then fine-tune it; return errors."""
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    sums = {n: torch.zeros(m.in_features, m.in_features, device=m.weight.device) for n, m in linears.items()}
    count = [0]

    def accumulate(name):
        def hook(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.T, x)

        return hook

    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in linears.items()]
    targets = []
    try:
        with torch.no_grad():
            for x, kw in zip(inputs, kwargs):
                targets.append(_run(layer, x, kw))
                count[0] += x.shape[0] * x.shape[1]
    finally:
        for handle in handles:
            handle.remove()

    errors: dict[str, float] = {}
    bar = tqdm(linears.items(), desc=desc, unit="linear", leave=False)
    for name, linear in bar:
        h = sums.pop(name) / count[0]
        result = quantize_weight(linear.weight.detach().float(), h, s, generator)
        errors[name] = result.rel_error
        bar.set_postfix_str(f"{name} rel.err {result.rel_error:.4f}")
        layer.set_submodule(name, AQLinear(result, linear.bias).to(linear.weight.device))
    log.info(
        "%s: relative weighted error %s", desc, ", ".join(f"{n.split('.')[-1]} {e:.4f}" for n, e in errors.items())
    )
    if s.finetune_epochs > 0:
        finetune_layer(layer, inputs, kwargs, targets, s, generator, desc)
    return errors


def finetune_layer(
    layer: nn.Module,
    inputs: list[torch.Tensor],
    kwargs: list[dict],
    targets: list[torch.Tensor],
    s: AQSettings,
    generator: torch.Generator,
    desc: str,
) -> None:
    """Adam on codebooks and scales against the unquantized layer's outputs; kept only if the output error fell."""
    modules = [m for m in layer.modules() if isinstance(m, AQLinear)]
    params = [p for m in modules for p in (m.codebooks, m.scales)]

    def output_error() -> float:
        with torch.no_grad():
            num = sum(float(((_run(layer, x, kw) - y) ** 2).sum()) for x, kw, y in zip(inputs, kwargs, targets))
            return num / sum(float((y * y).sum()) for y in targets)

    before = output_error()
    saved = [p.detach().clone() for p in params]
    layer.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=s.finetune_lr)
    try:
        with torch.enable_grad():
            for _ in range(s.finetune_epochs):
                for b in torch.randperm(len(inputs), generator=generator, device=generator.device).tolist():
                    y = targets[b]
                    loss = F.mse_loss(_run(layer, inputs[b], kwargs[b]), y) / (y * y).mean()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
    finally:
        for p in params:
            p.requires_grad_(False)
    after = output_error()
    if after > before:
        with torch.no_grad():
            for p, old in zip(params, saved):
                p.copy_(old)
        after = before
    log.info("%s: fine-tuned codebooks and scales, relative output error %.4f -> %.4f", desc, before, after)


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint transformers' AQLM integration loads
# ---------------------------------------------------------------------------------------------------------------


def quantization_config(s: AQSettings) -> dict:
    """The `quantization_config` of config.json. Module names, not weight names, in the skip list: transformers
    matches this list against module names (see upstream.quantizers.fix_not_to_quantize)."""
    return {
        "quant_method": "aqlm",
        "in_group_size": s.in_group_size,
        "out_group_size": 1,
        "num_codebooks": s.num_codebooks,
        "nbits_per_codebook": s.nbits_per_codebook,
        "linear_weights_not_to_quantize": ["lm_head"],
    }


def write_checkpoint(
    model: nn.Module,
    s: AQSettings,
    out_dir: Path,
    weights_dtype: torch.dtype,
    float_dtype: torch.dtype = torch.float16,
    config_dtype: str = "float32",
) -> None:
    """Write config.json, generation_config.json and safetensors shards in the AQLM format.

    Per quantized linear P: P.codes [out, in/8, M] int8/int16, P.codebooks [M, 2^B, 1, 8] and P.scales
    [out, 1, 1, 1] in `float_dtype` (float16, as the published AQLM checkpoints); no P.weight. Every other floating
    tensor (embeddings, norms, lm_head) is stored in `weights_dtype`, the source model's. `config_dtype` is what `dtype="auto"` loads: float32, because aqlm's CPU kernel
    for 8-bit codebooks refuses anything else (on a GPU, load with dtype=torch.float16).
    """
    from huggingface_hub import save_torch_state_dict

    out_dir.mkdir(parents=True, exist_ok=True)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, AQLinear)}
    skip = tuple(f"{n}." for n in quantized)
    state = {
        k: (v.to(weights_dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith(skip)
    }
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # transformers re-ties it on load
    for name, module in quantized.items():
        for k, v in module.aqlm_tensors(float_dtype, s.nbits_per_codebook).items():
            state[f"{name}.{k}"] = v.cpu()
    save_torch_state_dict(state, out_dir, metadata={"format": "pt"})

    config = model.config.__class__.from_dict(model.config.to_dict())
    config.quantization_config = quantization_config(s)
    config.dtype = config_dtype
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
