"""vLLM's capability file is shared by every job of a machine: probed once, written whole, read by all."""

from __future__ import annotations

import json

import pytest

from helpers.together import run_together

PROBE = """
import json, logging
from pathlib import Path
from quantbench.job.bench.backends import vllm
logging.basicConfig(level=logging.INFO, format="%(message)s")
"""


@pytest.mark.e2e
def test_jobs_asking_at_once_probe_vllm_once_and_read_the_same_whole_file(tmp_path):
    """Two jobs start on a machine whose vLLM was never probed: one probes (under a lock), the other waits and reads
    the file it wrote, which is never seen half-written."""
    body = "print('CAPS', json.dumps(vllm.capabilities(Path(sys.argv[1]))))"
    done = run_together([(PROBE, body, [str(tmp_path)])] * 2, timeout=900)
    for result in done:
        assert result.returncode == 0, result.stdout[-3000:]
    assert sum(r.stdout.count("Probing what") for r in done) == 1, [r.stdout[-2000:] for r in done]
    caps = [json.loads(line[5:]) for r in done for line in r.stdout.splitlines() if line.startswith("CAPS ")]
    assert len(caps) == 2 and caps[0] == caps[1] and "quantization_methods" in caps[0]
    (written,) = tmp_path.glob("capabilities-*.json")
    assert json.loads(written.read_text()) == caps[0]
    assert not list(tmp_path.glob(".*tmp*"))  # the probe's temporary file was renamed into place
