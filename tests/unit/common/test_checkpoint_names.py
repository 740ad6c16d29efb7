"""Weights under checkpoint names and back (``rlfleet.common.checkpoint_names``).

The rules are transformers' own (its conversion mapping, reversed as save_pretrained
reverses it); these tests pin what they do for the families rlfleet serves: which
names, which slices of the fused expert tensors, and that save_pretrained writes
exactly what ``to_checkpoint_names`` returns.
"""

from __future__ import annotations

import pytest
import torch
from rlfleet.common import checkpoint_names
from rlfleet.common.architectures import ARCHITECTURES, MOE_ARCHITECTURES, tiny_config
from rlfleet.common.checkpoint_names import (
    checkpoint_sources,
    checkpoint_specs,
    checkpoint_tie_groups,
    converts,
    gather_in_checkpoint_names,
    to_checkpoint_names,
    to_model_names,
)
from rlfleet.common.tinymodel import BOS, EOS, PAD
from safetensors import safe_open

SPECIAL = {PAD: 0, BOS: 1, EOS: 2}


def make(arch: str, seed: int = 0, **sizes):
    import transformers

    config = tiny_config(arch, vocab_size=96, special_ids=SPECIAL, **sizes)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def models():
    return {arch: make(arch) for arch in ARCHITECTURES}


def test_qwen3_moe_experts_are_unfused_into_per_expert_tensors(models):
    model = models["qwen3_moe"]
    sd = model.state_dict()
    ck = to_checkpoint_names(model, sd)
    inter = model.config.moe_intermediate_size
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        gate_up, down = sd[f"{p}.experts.gate_up_proj"], sd[f"{p}.experts.down_proj"]
        assert gate_up.shape == (4, 2 * inter, 64) and down.shape == (4, 64, inter)
        for e in range(4):
            assert torch.equal(ck[f"{p}.experts.{e}.gate_proj.weight"], gate_up[e, :inter])
            assert torch.equal(ck[f"{p}.experts.{e}.up_proj.weight"], gate_up[e, inter:])
            assert torch.equal(ck[f"{p}.experts.{e}.down_proj.weight"], down[e])
        assert torch.equal(ck[f"{p}.gate.weight"], sd[f"{p}.gate.weight"])  # the router
    assert not [k for k in ck if "gate_up_proj" in k or "experts.down_proj" in k]
    # Everything else keeps its name and tensor.
    for k, v in sd.items():
        if ".experts." not in k:
            assert ck[k] is v or torch.equal(ck[k], v)
    assert len(ck) == len(sd) - 4 + 2 * 4 * 3


def test_mixtral_experts_and_block_sparse_moe_names(models):
    model = models["mixtral"]
    sd = model.state_dict()
    ck = to_checkpoint_names(model, sd)
    inter = model.config.intermediate_size
    for layer in range(2):
        p, q = f"model.layers.{layer}.mlp", f"model.layers.{layer}.block_sparse_moe"
        for e in range(4):  # w1 = gate, w3 = up, w2 = down
            assert torch.equal(
                ck[f"{q}.experts.{e}.w1.weight"], sd[f"{p}.experts.gate_up_proj"][e, :inter]
            )
            assert torch.equal(
                ck[f"{q}.experts.{e}.w3.weight"], sd[f"{p}.experts.gate_up_proj"][e, inter:]
            )
            assert torch.equal(ck[f"{q}.experts.{e}.w2.weight"], sd[f"{p}.experts.down_proj"][e])
        assert torch.equal(ck[f"{q}.gate.weight"], sd[f"{p}.gate.weight"])
    assert not [k for k in ck if ".mlp." in k]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_names_are_what_save_pretrained_writes(models, arch, tmp_path):
    model = models[arch]
    ck = to_checkpoint_names(model, model.state_dict())
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(ck) == set(saved) | tied  # the publisher keeps tied keys; save_pretrained not
    assert all(torch.equal(saved[k], ck[k]) for k in saved)
    assert converts(model) is (arch in MOE_ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("by", ["model", "config"])
def test_round_trip_restores_names_shapes_and_values(models, arch, by):
    model = models[arch]
    source = model if by == "model" else model.config
    sd = model.state_dict()
    back = to_model_names(source, to_checkpoint_names(source, sd))
    assert list(sorted(back)) == sorted(sd)
    assert all(back[k].shape == sd[k].shape and torch.equal(back[k], sd[k]) for k in sd)
    fresh = make(arch, seed=1)
    fresh.load_state_dict(back, strict=True)


def test_experts_stack_in_natural_order_past_ten():
    """Expert 10 goes after 9, not after 1 (natural key order, as from_pretrained uses)."""
    import transformers

    config = tiny_config("qwen3_moe", vocab_size=96, special_ids=SPECIAL, num_layers=1)
    config.num_experts = 12
    model = transformers.AutoModelForCausalLM.from_config(config)
    sd = model.state_dict()
    ck = to_checkpoint_names(model, sd)
    assert sum(".gate_proj." in k for k in ck) == 12
    back = to_model_names(model, dict(reversed(list(ck.items()))))  # any input order
    for k in sd:
        assert torch.equal(back[k], sd[k])


def test_dense_families_pass_through(models):
    for arch in ("llama", "qwen2", "qwen3"):
        sd = models[arch].state_dict()
        for fn in (to_checkpoint_names, to_model_names):
            out = fn(models[arch], sd)
            assert out is not sd and list(out) == list(sd)
            assert all(out[k] is sd[k] for k in sd)


def test_checkpoint_names_are_left_alone(models):
    """Names already in the checkpoint format convert to themselves (no double renaming)."""
    for arch in ARCHITECTURES:
        ck = to_checkpoint_names(models[arch], models[arch].state_dict())
        again = to_checkpoint_names(models[arch], ck)
        assert set(again) == set(ck) and all(torch.equal(again[k], ck[k]) for k in ck)


def test_model_names_are_left_alone(models):
    """In-memory names convert to themselves: a loader may convert unconditionally."""
    for arch in ARCHITECTURES:
        sd = models[arch].state_dict()
        again = to_model_names(models[arch], sd)
        assert set(again) == set(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


def test_a_bucket_converts_on_its_own(models):
    """Layer by layer (a publisher's buckets) equals all at once in this direction."""
    model = models["qwen3_moe"]
    sd = model.state_dict()
    whole = to_checkpoint_names(model, sd)
    buckets: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        buckets.setdefault(".".join(k.split(".")[:3]) if ".layers." in k else "rest", {})[k] = v
    assert len(buckets) == 3
    pieces: dict[str, torch.Tensor] = {}
    for bucket in buckets.values():
        pieces.update(to_checkpoint_names(model, bucket))
    assert set(pieces) == set(whole) and all(torch.equal(pieces[k], whole[k]) for k in whole)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_specs_from_the_config_alone(models, arch):
    model = models[arch]
    expected = {
        k: (tuple(v.shape), v.dtype)
        for k, v in to_checkpoint_names(model, model.state_dict()).items()
    }
    assert checkpoint_specs(model.config) == expected
    assert checkpoint_specs(model) == expected


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tie_groups_in_checkpoint_names(models, arch):
    groups = checkpoint_tie_groups(models[arch].config)
    assert set(groups) == set(checkpoint_specs(models[arch].config))
    tied = models[arch].config.tie_word_embeddings
    assert (groups["lm_head.weight"] == groups["model.embed_tokens.weight"]) is tied
    assert len(set(groups.values())) == len(groups) - (1 if tied else 0)


def test_sources_of_each_checkpoint_tensor(models):
    moe = checkpoint_sources(models["qwen3_moe"])
    assert moe["model.layers.1.mlp.experts.3.up_proj.weight"] == (
        "model.layers.1.mlp.experts.gate_up_proj",
    )
    assert moe["model.layers.1.mlp.experts.3.down_proj.weight"] == (
        "model.layers.1.mlp.experts.down_proj",
    )
    assert moe["model.layers.1.mlp.gate.weight"] == ("model.layers.1.mlp.gate.weight",)
    mixtral = checkpoint_sources(models["mixtral"])
    assert mixtral["model.layers.0.block_sparse_moe.gate.weight"] == (
        "model.layers.0.mlp.gate.weight",
    )
    llama = checkpoint_sources(models["llama"])
    assert all(src == (name,) for name, src in llama.items())
    for arch in ARCHITECTURES:  # every checkpoint tensor, from one in-memory tensor each
        sources = checkpoint_sources(models[arch])
        assert set(sources) == set(checkpoint_specs(models[arch]))
        assert {s for src in sources.values() for s in src} == set(models[arch].state_dict())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gather_by_buckets_of_checkpoint_names(models, arch):
    """A payload laid out in checkpoint names, filled bucket by bucket from a gather by
    in-memory names (the sharded trainer's), equals converting everything at once."""
    model = models[arch]
    sd = model.state_dict()
    whole = to_checkpoint_names(model, sd)
    asked: list[list[str]] = []

    def gather(names):
        asked.append(names)
        return {n: sd[n] for n in names}

    names = sorted(whole)
    got: dict[str, torch.Tensor] = {}
    for i in range(0, len(names), 7):
        got.update(gather_in_checkpoint_names(model, names[i : i + 7], gather))
    assert set(got) == set(whole) and all(torch.equal(got[k], whole[k]) for k in whole)
    assert all(len(a) == len(set(a)) for a in asked)  # each source once per bucket
    # Other ranks: the gather returns nothing, and so does this.
    assert gather_in_checkpoint_names(model, names[:7], lambda names: {}) == {}


def test_a_wrapped_class_keeps_its_family_rules(models):
    """FSDP2's fully_shard swaps the class for FSDP<Name>; the model type still decides."""
    model = make("qwen3_moe")
    model.__class__ = type("FSDPQwen3MoeForCausalLM", (type(model),), {})
    sd = model.state_dict()
    assert set(to_checkpoint_names(model, sd)) == set(
        to_checkpoint_names(models["qwen3_moe"], models["qwen3_moe"].state_dict())
    )


def test_loaded_model_uses_the_conversions_from_pretrained_recorded(models, tmp_path):
    from transformers import AutoModelForCausalLM

    models["mixtral"].save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert [type(c).__name__ for c in checkpoint_names.conversions(loaded)] == [
        "WeightRenaming", "WeightConverter", "WeightConverter",
    ]  # fmt: skip
    assert set(to_checkpoint_names(loaded, loaded.state_dict())) == set(
        to_checkpoint_names(models["mixtral"], models["mixtral"].state_dict())
    )


def test_a_model_loaded_from_memory_layout_still_publishes_the_hub_format(models, tmp_path):
    """A directory saved in transformers 5's memory layout (fused experts) loads with no
    transform used; save_pretrained would write it back fused, rlfleet publishes the
    per-expert names all the same."""
    from transformers import AutoModelForCausalLM

    model = models["qwen3_moe"]
    model.save_pretrained(tmp_path, save_original_format=False)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert loaded._weight_conversions == []
    expected = to_checkpoint_names(model, model.state_dict())
    got = to_checkpoint_names(loaded, loaded.state_dict())
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in got)
    assert set(checkpoint_specs(loaded)) == set(expected)
    back = to_model_names(loaded, got)
    assert all(torch.equal(back[k], v) for k, v in loaded.state_dict().items())
    assert loaded._weight_conversions == []  # the model itself is left as it was


def test_without_transformers_conversions_both_ways_are_identities(models, monkeypatch):
    """transformers < 5 keeps checkpoint names in memory: nothing to convert."""
    monkeypatch.setattr(checkpoint_names, "_core", lambda: None)
    sd = models["qwen3_moe"].state_dict()
    assert list(to_checkpoint_names(models["qwen3_moe"], sd)) == list(sd)
    assert list(to_model_names(models["qwen3_moe"], sd)) == list(sd)
    assert not converts(models["qwen3_moe"])
