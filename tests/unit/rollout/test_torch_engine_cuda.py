"""The PyTorch engine on CUDA: the shared engine suite with the engine on the GPU
(scripts/gpu_check.sh runs it; without CUDA it skips, which CI expects of `gpu` tests)."""

from __future__ import annotations

import pytest
import torch
from engine_suite import *  # noqa: F403 - the shared engine suite runs on this engine
from rlfleet.rollout.torch_engine import TorchEngine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def make_engine():
    torch.backends.cuda.matmul.allow_tf32 = False  # compared with fp32 CPU references
    return lambda: TorchEngine(device="cuda", dtype="float32")
