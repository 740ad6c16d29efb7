"""Checkpoints: Hugging Face format, atomic, pruned to the newest ``keep``."""

from __future__ import annotations

import json

import pytest
import torch
from rlfleet.trainer.checkpoint import CheckpointStore


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


def test_checkpoints_load_with_transformers_and_are_pruned(tmp_path, tiny_model_dir, model_and_opt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, opt = model_and_opt
    store = CheckpointStore(tmp_path, "job-1", keep=2)
    for step in range(3):
        path = store.save(
            step=step,
            model=model,
            weights=model.state_dict(),
            optimizer_state=opt.state_dict(),
            tokenizer_dir=tiny_model_dir,
            state={"x": step},
        )
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

    saved_state = opt.state_dict()["state"]
    for key, value in store.optimizer_state(latest)["state"].items():
        assert torch.equal(value["exp_avg"], saved_state[key]["exp_avg"])


def test_half_written_checkpoints_never_look_complete(tmp_path, tiny_model_dir, model_and_opt):
    model, opt = model_and_opt
    store = CheckpointStore(tmp_path, "job-2", keep=3)
    store.save(
        step=0,
        model=model,
        weights=model.state_dict(),
        optimizer_state=opt.state_dict(),
        tokenizer_dir=tiny_model_dir,
        state={},
    )

    class Exploding:  # fails while the optimizer state is being written
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError):
        store.save(step=1, model=model, weights=model.state_dict(),
                   optimizer_state={"state": Exploding()}, tokenizer_dir=tiny_model_dir,
                   state={})  # fmt: skip
    assert not (store.dir / "step-1").exists()
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
    store.save(
        step=4,
        model=model,
        weights=model.state_dict(),
        optimizer_state=opt.state_dict(),
        tokenizer_dir=tiny_model_dir,
        state={"n": 1},
    )
    store.save(
        step=4,
        model=model,
        weights=model.state_dict(),
        optimizer_state=opt.state_dict(),
        tokenizer_dir=tiny_model_dir,
        state={"n": 2},
    )
    assert [(c.step, c.state["n"]) for c in store.checkpoints()] == [(4, 2)]
    assert sorted(p.name for p in store.dir.iterdir()) == ["step-4"]
