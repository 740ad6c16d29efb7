"""Fixtures of the rollout tests: a tiny model whose greedy outputs are worth comparing.

The shared ``tiny_model_dir`` is initialised with std 0.02 and tied embeddings, so
its greedy continuation just repeats the last token and never ends; a test that
"greedy equals argmax" would then prove little. ``suite_model_dir`` re-draws the
same architecture's weights with a larger spread and a stronger EOS embedding:
greedy outputs vary, and some sequences stop early while others run to the limit.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def sharpen_model(src: Path, dst: Path, *, seed: int = 1, std: float = 0.1) -> Path:
    """Copies the HF model at ``src`` to ``dst`` with re-drawn, higher-variance weights."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(src, dst, dirs_exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        eos = model.config.eos_token_id
        model.get_input_embeddings().weight[eos] *= 2.0  # tied: makes EOS a likely argmax
    model.save_pretrained(dst, safe_serialization=True)
    return dst


@pytest.fixture(scope="session")
def suite_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return sharpen_model(tiny_model_dir, tmp_path_factory.mktemp("sharp-model"))


@pytest.fixture(scope="session")
def reference_model(suite_model_dir):
    """The same model through plain transformers, float32 on CPU: the ground truth."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(suite_model_dir), dtype=torch.float32).eval()


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    """The test machine's cores are shared; tiny models gain nothing from more threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
