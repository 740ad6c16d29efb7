"""Tiny models of real architectures (``rlfleet.common.architectures``)."""

from __future__ import annotations

import json

import pytest
import torch
from rlfleet.common.architectures import (
    ARCHITECTURES,
    MOE_ARCHITECTURES,
    build_model,
    parameter_count,
)
from rlfleet.common.tinymodel import BOS, EOS, PAD

FAMILY = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3_moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "mixtral": ("mixtral", "MixtralForCausalLM"),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("archs")
    return {arch: build_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_each_family_builds_a_tiny_model_that_loads(built, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = built[arch]
    config = json.loads((path / "config.json").read_text())
    model_type, cls = FAMILY[arch]
    assert config["model_type"] == model_type and config["architectures"] == [cls]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    # vLLM's CPU attention takes heads of 32 and up; grouped-query attention (2 : 1).
    assert (config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]) == (
        32, 2, 1,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert type(model).__name__ == cls
    assert 50_000 < parameter_count(model) < 500_000
    from tokenizers import Tokenizer

    tok = AutoTokenizer.from_pretrained(str(path))  # a qwen2 one: Qwen2Tokenizer
    text = "What is 12 + 7? Answer: 19."
    ids = tok(text)["input_ids"]
    assert ids == Tokenizer.from_file(str(path / "tokenizer.json")).encode(text).ids
    assert tok.decode(ids) == text
    assert max(ids) < config["vocab_size"] == len(tok) == 384
    for name, key in ((BOS, "bos_token_id"), (EOS, "eos_token_id"), (PAD, "pad_token_id")):
        assert tok.convert_tokens_to_ids(name) == config[key]
    assert config["tie_word_embeddings"] is (arch not in MOE_ARCHITECTURES)


def test_each_family_keeps_what_distinguishes_it(built):
    from transformers import AutoModelForCausalLM

    names = {
        arch: set(AutoModelForCausalLM.from_pretrained(str(path)).state_dict())
        for arch, path in built.items()
    }
    assert "model.layers.0.self_attn.q_proj.bias" in names["qwen2"]  # q/k/v biases
    assert "model.layers.0.self_attn.q_proj.bias" not in names["llama"]
    assert "model.layers.0.self_attn.q_norm.weight" in names["qwen3"]  # q/k RMS norms
    assert "model.layers.0.self_attn.q_norm.weight" in names["qwen3_moe"]
    for arch in MOE_ARCHITECTURES:  # transformers 5 keeps the experts fused in memory
        assert "model.layers.1.mlp.experts.gate_up_proj" in names[arch]
        assert "model.layers.1.mlp.gate.weight" in names[arch]
    from transformers import AutoConfig

    # (transformers 5 writes Qwen3-MoE's num_experts as num_local_experts, and reads both.)
    moe = AutoConfig.from_pretrained(str(built["qwen3_moe"]))
    assert (moe.num_experts, moe.num_experts_per_tok, moe.mlp_only_layers) == (4, 2, [])


def test_greedy_continuations_differ_between_prompts(built):
    """init_std 0.1: the argmax is not just the last token repeated (std 0.02's habit)."""
    from transformers import AutoModelForCausalLM

    for arch, path in built.items():
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        with torch.no_grad():
            nxt = model(input_ids=torch.tensor([[5, 40, 100], [17, 9, 9], [31, 61, 124]]))
        argmax = nxt.logits[:, -1].argmax(-1).tolist()
        assert len(set(argmax)) > 1, arch
        assert argmax != [100, 9, 124], arch


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = build_model("qwen3_moe", tmp_path / "a", seed=4)
    b = build_model("qwen3_moe", tmp_path / "b", seed=4)
    c = build_model("qwen3_moe", tmp_path / "c", seed=5)
    data = [(p / "model.safetensors").read_bytes() for p in (a, b, c)]
    assert data[0] == data[1] != data[2]


def test_unknown_architecture_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'gpt2'; known: llama"):
        build_model("gpt2", tmp_path)
