"""The walking skeleton, end to end: `python run.py -m` (the default sweep) through real Hydra, real lm-eval,
real bitsandbytes and a real MLflow store; the assertions read what the store holds."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

EXPECTED_METRICS = [
    "disk_gb",
    "weight_gb",
    "bits_per_weight",
    "peak_mem_gb",
    "quantize_s",
    "tiny_facts_acc",
    "tiny_facts_acc_stderr",
    "tiny_arith_acc",
    "tokens_per_s_1_stream",
    "tokens_per_s_8_streams",
    "tokens_per_s_1_stream_min",
    "tokens_per_s_1_stream_max",
    "ttft_s_1_stream",
    "quality_kl_mean",
    "quality_kl_p99",
    "quality_top1_agreement",
    "quality_ppl",
    "job_s",  # the stage times (quantbench.job.pipeline._stage_time)
    "stage_quantize_s",
    "stage_verify_s",
    "stage_eval_s",
]


@pytest.fixture(scope="module")
def runs(default_sweep):
    return {r.data.tags["method"]: r for r in default_sweep.runs()}


def default_methods() -> list[str]:
    from omegaconf import OmegaConf

    from conftest import ROOT

    return sorted(str(OmegaConf.load(ROOT / "conf" / "config.yaml").hydra.sweeper.params.method).split(","))


def test_the_default_sweep_finishes_one_run_per_method(runs, default_sweep):
    assert sorted(runs) == default_methods()
    assert {"fp16", "bnb_nf4", "awq", "gptq", "autoround_sym"} <= set(runs)
    assert all(r.info.status == "FINISHED" for r in runs.values())
    assert len({r.data.tags["sweep_id"] for r in runs.values()}) == 1  # one sweep, one tag


def test_each_run_logs_the_metrics_with_units(runs):
    for method, run in runs.items():
        missing = [m for m in EXPECTED_METRICS if m not in run.data.metrics]
        assert not missing, f"{method} lacks {missing}"
        assert run.data.metrics["tokens_per_s_8_streams"] > 0
        # the HF backend names the decode path it ran (bench=smoke asks for the dynamic cache on a CPU)
        assert run.data.tags["bench_path"].startswith("transformers.generate, dynamic KV cache, eager decode"), method


def test_params_are_the_resolved_config_and_tags_say_where_it_ran(runs):
    run = runs["bnb_nf4"]
    assert run.data.params["method.quant_type"] == "nf4"
    assert run.data.params["bench.streams"] == "[1, 8]"
    assert run.data.params["model.pretrained"] == "embedded:tiny"
    from importlib.metadata import version

    tags = run.data.tags
    assert (tags["version.torch"], tags["version.transformers"]) == (version("torch"), version("transformers"))
    assert tags["quant_library"] == "bitsandbytes" and tags["quant_library_version"] == version("bitsandbytes")
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"]), tags["git_commit"]  # "unknown" would not do
    assert tags["hardware"] == "cpu"
    assert "Linear4bit" in run.data.tags["eval_kernel"]
    assert "torch.nn.modules.linear.Linear" in runs["fp16"].data.tags["eval_kernel"]


GATES = sorted((Path(__file__).parent / "quality_gates").glob("*.yaml"))


def test_every_method_of_the_default_sweep_has_a_quality_gate():
    assert sorted(p.stem for p in GATES) == default_methods()


@pytest.mark.parametrize("gate", GATES, ids=lambda p: p.stem)
def test_each_method_passes_its_quality_gate(runs, gate):
    """quality_gates/<method>.yaml (the thresholds and what was measured, like llm-compressor's lm-eval configs):
    bits per weight in range, accuracy above a floor or a recovery of fp16's accuracy, the next-token KL divergence
    from fp16 below a ceiling and top-1 agreement with it above a floor."""
    g = yaml.safe_load(gate.read_text())
    q, fp16 = runs[g["method"]].data.metrics, runs["fp16"].data.metrics
    low, high = g["bits_per_weight"]
    failed = [] if low <= q["bits_per_weight"] <= high else [f"bits_per_weight {q['bits_per_weight']:.3f}"]
    for task, floor in g.get("accuracy_min", {}).items():
        if q[f"{task}_acc"] < floor:
            failed.append(f"{task}_acc {q[f'{task}_acc']:.4f} < {floor}")
    for task, floor in g.get("recovery_min", {}).items():
        if q[f"{task}_acc"] < floor * fp16[f"{task}_acc"]:
            failed.append(f"{task} recovery {q[f'{task}_acc'] / fp16[f'{task}_acc']:.4f} < {floor}")
    if q["quality_kl_mean"] > g["kl_mean_max"]:
        failed.append(f"quality_kl_mean {q['quality_kl_mean']:.2e} > {g['kl_mean_max']}")
    if q["quality_top1_agreement"] < g["top1_agreement_min"]:
        failed.append(f"quality_top1_agreement {q['quality_top1_agreement']:.4f} < {g['top1_agreement_min']}")
    assert not failed, f"{g['method']}: " + "; ".join(failed)


@pytest.mark.parametrize("method", ["bnb_nf4", "awq", "gptq", "autoround_sym"])
def test_each_4bit_method_stores_its_weights_in_under_0_6_of_fp16s_bytes(runs, method):
    fp16, q = runs["fp16"].data.metrics, runs[method].data.metrics
    assert fp16["bits_per_weight"] == 16
    assert q["weight_gb"] < 0.6 * fp16["weight_gb"]


def test_distribution_quality_ranks_the_baseline_4_bit_and_2_bit_apart(runs):
    """On the same held-out text: fp16 is the baseline (KL 0, every top-1 kept); every 4-bit method moves the
    next-token distribution measurably but less than AQLM's 2 bits do. Top-1 agreement does not rank them on the
    recipe-v3 model: its held-out sentences have flat next-token distributions (perplexity ~142), whose near-ties
    flip under any rounding (4-bit 90.6-92.6 %, AQLM 90.0 %: docs/quality.md), so only "below 100 %" is asserted."""
    fp16 = runs["fp16"].data.metrics
    assert fp16["quality_kl_mean"] == 0 and fp16["quality_top1_agreement"] == 1
    two_bit = runs["aqlm_2bit"].data.metrics
    assert two_bit["quality_top1_agreement"] < 1
    for method in ("bnb_nf4", "awq", "gptq", "autoround_sym"):
        q = runs[method].data.metrics
        assert 0 < q["quality_kl_mean"] < two_bit["quality_kl_mean"], method
        assert q["quality_kl_p99"] >= q["quality_kl_mean"], method
        assert q["quality_top1_agreement"] < 1, method
        assert q["quality_tokens"] == fp16["quality_tokens"]  # the same text for every run


def test_every_finished_run_went_through_the_fresh_process_artifact_check(runs):
    """The tag and the reload's loss are set only once the check passed, so this shows that no job skipped it;
    whether the check catches a bad artifact is tests/job/test_fingerprint.py's to show."""
    for method, run in runs.items():
        assert run.data.tags["artifact_verified"] == "true", method
        assert "fingerprint_reload_nll" in run.data.metrics, method
    assert runs["fp16"].data.tags["quant_format"] == "safetensors-bfloat16"  # named once the dtype is known


def test_artifacts_hold_config_results_and_a_model_that_reloads_and_generates(runs, default_sweep, tmp_path):
    """The run's artifacts hold its config and results; its model is the run's MLflow logged model (stored there,
    once), with the run's metrics linked to it."""
    from quantbench.tracking import logged_model

    for method, run in runs.items():
        names = {a.path for a in default_sweep.client.list_artifacts(run.info.run_id)}
        assert {"config", "eval", "bench"} <= names and "model" not in names
        model = logged_model.of_run(default_sweep.client, run.info.run_id)
        assert model.source_run_id == run.info.run_id and model.tags["method"] == method
        assert {m.key for m in model.metrics} == set(run.data.metrics), method
        local = str(logged_model.download(model, tmp_path / method, default_sweep.uri))
        script = (
            "import sys, torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "for a, b in json.loads(sys.argv[2]):\n"
            "    ids = t(f'Q: What is {a} plus {b}? A:', return_tensors='pt').input_ids\n"
            "    out = m.generate(ids, max_new_tokens=2, do_sample=False)\n"
            "    print('GENERATED', a + b, t.decode(out[0, ids.shape[1]:]))\n"
        )
        # fp16 gets 20 sums (a trained model answers most greedily; random weights would answer almost none), the
        # quantized artifacts one each (they only have to load and answer with a number)
        sums = [[(7 * i) % 20, (11 * i + 3) % 20] for i in range(20 if method == "fp16" else 1)]
        out = subprocess.run(
            [sys.executable, "-c", "import json\n" + script, local, json.dumps(sums)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        answers = re.findall(r"^GENERATED (\d+) (\d+)", out.stdout, re.M)
        assert len(answers) == len(sums), out.stdout  # every artifact answers with a number
        if method == "fp16":  # greedy generation is harder than lm-eval's multiple choice: 18 of 20 here
            assert sum(truth == said for truth, said in answers) >= 8, out.stdout


def test_each_job_gets_one_folder_under_multirun_named_by_what_it_changed(default_sweep, runs):
    """One folder per job, directly under the sweep folder: overrides that only say where things go (the store, the
    caches) are left out of the folder's name, so a path in them cannot nest folders."""
    jobs = sorted(p.parent.name for p in Path(default_sweep.artifacts).parents[1].glob("multirun/*/.hydra"))
    assert len(jobs) == len(runs), jobs
    assert all("=" not in name or "dir=" not in name for name in jobs), jobs
