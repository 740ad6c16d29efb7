"""Tiny Hugging Face-format models built offline (no downloads are possible here).

A byte-level BPE tokenizer trained with ``tokenizers`` on task text, and a small
Llama-style ``transformers`` model from a config, saved with ``save_pretrained``
so every service loads it through the same code a user's real model takes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 512, split_digits: bool = False):
    """``split_digits``: numbers become single digits (as Qwen's and Llama 3's tokenizers
    do), so "874" is the same three tokens wherever it stands."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def llama_config(tok, *, hidden_size: int, num_layers: int, num_heads: int, max_positions: int):
    """A small Llama's config for a tokenizer of ``train_tokenizer`` (tied embeddings,
    MLP 4x wide, no grouped-query attention)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        tie_word_embeddings=True,
    )


def arithmetic_corpus(n: int = 4000, *, seed: int = 0) -> list[str]:
    """Question/answer text of reasoning-gym basic_arithmetic, for the tokenizer."""
    import reasoning_gym

    ds = reasoning_gym.create_dataset(
        "basic_arithmetic", size=n, seed=seed, min_terms=2, max_terms=3, min_digits=1, max_digits=2
    )
    return [f"{e['question']} Answer: {e['answer']}" for e in ds]


def build_tiny_model(
    out_dir: str | Path,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Writes a randomly initialised Llama-style model and its tokenizer to ``out_dir``."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(
        texts if texts is not None else arithmetic_corpus(), vocab_size=vocab_size
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )
    hf_tok.save_pretrained(out)
    torch.manual_seed(seed)
    config = llama_config(tok, hidden_size=hidden_size, num_layers=num_layers,
                          num_heads=num_heads, max_positions=max_positions)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "rlfleet_model.json").write_text(
        json.dumps({"built_by": "rlfleet.common.tinymodel", "seed": seed})
    )
    return out
