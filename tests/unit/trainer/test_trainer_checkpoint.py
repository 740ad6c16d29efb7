"""Checkpoints: a Hugging Face directory (the published payload as model.safetensors),
AdamW's state as a torch.distributed.checkpoint, atomic, pruned to the newest ``keep``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from rlfleet.common.weights import encode_state_dict_into
from rlfleet.trainer.checkpoint import OPTIMIZER_DIR, CheckpointStore
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)


@pytest.fixture(scope="module")
def model_and_opt(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # one real step so the optimizer has state to save
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(store, step, model, opt, tokenizer_dir, state):
    """What the trainer does: the ranks write the optimizer (DCP), then rank 0 commits."""
    tmp = store.begin(step)
    dcp.save(
        {"optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=tmp / OPTIMIZER_DIR,
        no_dist=True,
    )
    payload = encode_state_dict_into(model.state_dict(), bytearray)
    return store.commit(tmp, step=step, payload=payload, model=model,
                        tokenizer_dir=tokenizer_dir, state=state)  # fmt: skip


def test_checkpoints_load_with_transformers_and_are_pruned(tmp_path, tiny_model_dir, model_and_opt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, opt = model_and_opt
    store = CheckpointStore(tmp_path, "job-1", keep=2)
    for step in range(3):
        path = _save(store, step, model, opt, tiny_model_dir, {"x": step})
        assert path == tmp_path / "job-1" / f"step-{step}"
    assert [c.step for c in store.checkpoints()] == [1, 2]
    latest = store.latest()
    assert latest.version == 3 and latest.state["x"] == 2
    assert json.loads((latest.path / "trainer_state.json").read_text())["version"] == 3

    loaded = AutoModelForCausalLM.from_pretrained(latest.path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    tok = AutoTokenizer.from_pretrained(latest.path)
    assert tok.encode("1 + 2", add_special_tokens=False)

    # AdamW's state comes back from the DCP directory into a fresh optimizer.
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    restored = {"optim": get_optimizer_state_dict(loaded, fresh)}
    dcp.load(restored, checkpoint_id=latest.path / OPTIMIZER_DIR, no_dist=True)
    set_optimizer_state_dict(loaded, fresh, restored["optim"])
    saved, got = opt.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == got.keys()
    for key, value in got.items():
        assert torch.equal(value["exp_avg"], saved[key]["exp_avg"])
        assert float(value["step"]) == float(saved[key]["step"]) == 1.0


def test_half_written_checkpoints_never_look_complete(tmp_path, tiny_model_dir, model_and_opt):
    model, opt = model_and_opt
    store = CheckpointStore(tmp_path, "job-2", keep=3)
    _save(store, 0, model, opt, tiny_model_dir, {})

    class Exploding:  # fails while the state is being written
        def __str__(self):
            raise OSError("disk full")

    with pytest.raises(OSError):
        _save(store, 1, model, opt, tiny_model_dir, {"bad": Exploding()})
    assert not (store.dir / "step-1").exists()
    assert [p.name for p in store.dir.iterdir()] == ["step-0"]  # its temp dir removed too
    assert [c.step for c in store.checkpoints()] == [0]

    # What a crash (kill -9) mid-write leaves: a hidden temp dir, and nothing else.
    (store.dir / ".step-5.tmp-dead").mkdir()
    (store.dir / ".step-5.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    (store.dir / "step-7").mkdir()  # no trainer_state.json: not a checkpoint
    assert store.latest().step == 0
    store.remove_partial()
    assert not (store.dir / ".step-5.tmp-dead").exists()


def test_saving_the_same_step_again_replaces_it(tmp_path, tiny_model_dir, model_and_opt):
    model, opt = model_and_opt
    store = CheckpointStore(tmp_path, "job-3", keep=2)
    _save(store, 4, model, opt, tiny_model_dir, {"n": 1})
    _save(store, 4, model, opt, tiny_model_dir, {"n": 2})
    assert [(c.step, c.state["n"]) for c in store.checkpoints()] == [(4, 2)]
    assert sorted(p.name for p in store.dir.iterdir()) == ["step-4"]
