"""A dtype name from config as a torch dtype, refused with the names that work (on the ground floor: the bench's
checks and the methods both need it before any model loads)."""

from __future__ import annotations

import torch

from quantbench.errors import ConfigError


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"dtype {name!r} is not a torch dtype; use float16, bfloat16 or float32.")
    return dtype
