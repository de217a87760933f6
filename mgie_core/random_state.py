"""The process's random state kept as the caller left it: a block that seeds or draws
from the global generators (a tiny model's maker, accelerate's ``set_seed``, a module's
initial weights) leaves Python's, NumPy's and torch's (CPU and CUDA) states unchanged
for the code that runs after it (a host's samplers, a seeded run)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import numpy as np
import torch


@contextlib.contextmanager
def preserved() -> Iterator[None]:
    """Run the block, then put back the Python, NumPy and torch (CPU and every initialised
    CUDA device) generator states, also when the block raises."""
    py, npy = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
