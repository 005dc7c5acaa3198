"""One skip mark for what a test needs of the machine, each unmet need with its reason (after
lightning-hydra-template's tests/helpers/run_if.py):

    @run_if(cuda=True)          a CUDA GPU (the `pytest -m gpu` tests; CI has none, so they are skipped there)
    @run_if(cuda=False)         no CUDA GPU (what quantbench does on a machine without one)
    @run_if(accelerator=False)  no accelerator of any kind (CUDA, MPS, XPU, ...)
    @run_if(slurm=True)         a single-node SLURM cluster can be started here (helpers/slurm_cluster.py)
"""

from __future__ import annotations

import pytest


def run_if(*, cuda: bool | None = None, accelerator: bool | None = None, slurm: bool = False) -> pytest.MarkDecorator:
    unmet: list[str] = []
    if cuda is not None or accelerator is not None:
        import torch

        if cuda is not None and torch.cuda.is_available() != cuda:
            unmet.append("needs a CUDA GPU" if cuda else "needs a machine without a CUDA GPU")
        if accelerator is not None and torch.accelerator.is_available() != accelerator:
            unmet.append("needs an accelerator" if accelerator else "needs a machine without an accelerator")
    if slurm:
        from helpers import slurm_cluster

        if (why := slurm_cluster.unavailable_reason()) is not None:
            unmet.append(why)
    return pytest.mark.skipif(bool(unmet), reason="; ".join(unmet) or "every need is met")
