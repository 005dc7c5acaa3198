"""The job as stages (quantbench.job.pipeline): each stage returns what it made and `run` logs it once; a stage a method
does not need is skipped by what the method declares."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from omegaconf import OmegaConf

from quantbench.job import methods, pipeline
from quantbench.job.methods.base import Method


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_a_method_declares_whether_the_cache_may_keep_its_artifact_and_it_matches_what_it_implements():
    for module in pkgutil.iter_modules(methods.__path__):
        importlib.import_module(f"quantbench.job.methods.{module.name}")
    found = {cls.__name__: cls.cacheable for cls in _subclasses(Method)}
    assert found["GPTQ"] and found["AWQ"] and not found["FP16"] and not found["BnbNF4"], found
    for cls in _subclasses(Method):
        assert cls.cacheable == (cls.load_saved is not Method.load_saved), cls.__name__


def test_a_stage_result_is_logged_once_each_kind_in_its_own_call():
    calls = []

    class Recorder:  # the tracker's logging surface
        def log_params(self, params):
            calls.append(("params", dict(params)))

        def log_metrics(self, metrics):
            calls.append(("metrics", dict(metrics)))

        def set_tags(self, tags):
            calls.append(("tags", dict(tags)))

        def log_json(self, content, name):
            calls.append(("json", name))

    work = pipeline.Work(OmegaConf.create({}), Recorder(), None, force=False, metrics={"earlier_s": 1.0})
    result = pipeline.StageResult({"disk_gb": 2.0}, {"cache": "off"}, {"calibration.hub_id": "x"}, {"a.json": {}})
    pipeline._log(work, result)
    assert calls == [("params", {"calibration.hub_id": "x"}), ("metrics", {"disk_gb": 2.0}),
                     ("tags", {"cache": "off"}), ("json", "a.json")]  # fmt: skip
    assert work.metrics == {"earlier_s": 1.0, "disk_gb": 2.0}


def test_the_job_reads_as_its_stages():
    lines = [line for line in inspect.getsource(pipeline.run).splitlines() if line.strip()]
    assert len(lines) < 40, len(lines)
    for stage in ("validate", "restore_or_quantize", "describe", "verify", "evaluate_stage", "quality_stage",
                  "bench_stage", "finish"):  # fmt: skip
        assert stage in inspect.getsource(pipeline.run), stage
