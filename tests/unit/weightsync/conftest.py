from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def make_state_dict():
    """Real torch state dicts of a small module; ``seed`` makes different versions."""
    torch.set_num_threads(1)

    def make(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(
            torch.nn.Embedding(64, 16), torch.nn.Linear(16, 16), torch.nn.LayerNorm(16)
        )
        state = model.state_dict()
        state["half"] = torch.randn(8, 8).to(torch.bfloat16)
        return state

    return make
