"""Tiny random-initialised models of real architectures, in Hugging Face format.

``build_model("qwen3_moe", out_dir)`` writes a directory that every rlfleet service
loads as it would a real model of that family: the family's own ``transformers``
config class (Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral) at toy sizes, the byte-level
BPE tokenizer of ``tinymodel``, weights from ``save_pretrained`` (which writes the
family's published checkpoint names, e.g. one tensor per expert for the MoEs).

The sizes fit vLLM's CPU backend: attention heads of 32 (its CPU kernels take head
sizes from 32 up) and grouped-query attention (2 query heads, 1 KV head). Weights
are drawn with ``init_std`` (0.1 by default, not the usual 0.02) so that greedy
continuations differ from prompt to prompt and sometimes reach EOS, which makes
comparing engines' outputs mean something.

Each family keeps what distinguishes it: Qwen2 its q/k/v biases, Qwen3 its q/k RMS
norms, Qwen3-MoE its top-k router over fused experts, Mixtral its
``block_sparse_moe`` naming. The dense ones tie the LM head to the embeddings (as
the small Llama 3.2 / Qwen models do); the MoEs do not.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlfleet.common.tinymodel import BOS, EOS, PAD, train_tokenizer

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHITECTURES = ("qwen3_moe", "mixtral")
# transformers 5 loads the tokenizer of a qwen2/qwen3 directory as Qwen2Tokenizer
# whatever tokenizer_config.json says: it rebuilds the pipeline with Qwen's NFC
# normaliser and split regex, and adds this token when the vocabulary lacks it. The
# tiny Qwen tokenizers are trained with that pipeline and hold the token, so every
# loader (tokenizers, AutoTokenizer, vLLM) gets the same ids.
QWEN_ENDOFTEXT = "<|endoftext|>"

# transformers class names and the settings each family is built with; the shared
# sizes are added by ``tiny_config``.
_FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {
            "tie_word_embeddings": False,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"tie_word_embeddings": False, "num_local_experts": 4, "num_experts_per_tok": 2},
    ),
}


_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen".split()
)
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _words(n: int) -> str:
    if n < 0:
        return "minus " + _words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    return _ONES[n // 100] + " hundred" + ("" if n % 100 == 0 else " and " + _words(n % 100))


def tiny_corpus(n: int = 600) -> list[str]:
    """Arithmetic question/answer text for the tokenizer (no dataset library needed), in
    digits and in words: enough distinct words that a Qwen-style tokenizer (digits
    split one by one) also fills its vocabulary."""
    out = []
    for i in range(n):
        a, b = (i * 37) % 97, (i * 53) % 89
        op, word, value = ("+", "plus", a + b) if i % 3 else ("-", "minus", a - b)
        out.append(f"What is {a} {op} {b}? Answer: {value}. The answer is {value}.")
        out.append(f"Question: {_words(a)} {word} {_words(b)}. Reply: {_words(value)}.")
    return out


def train_qwen_tokenizer(texts: Iterable[str], *, vocab_size: int = 384):
    """``tinymodel.train_tokenizer`` with Qwen2Tokenizer's normaliser and pre-tokenizer."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, QWEN_ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tiny_config(
    arch: str,
    *,
    vocab_size: int,
    special_ids: dict[str, int],
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_positions: int = 256,
    init_std: float = 0.1,
):
    """The ``transformers`` config of a tiny model of family ``arch``."""
    import transformers

    if arch not in _FAMILIES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    config_cls, _, extra = _FAMILIES[arch]
    return getattr(transformers, config_cls)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_std,
        bos_token_id=special_ids[BOS],
        eos_token_id=special_ids[EOS],
        pad_token_id=special_ids[PAD],
        **extra,
    )


def build_model(
    arch: str,
    out_dir: str | Path,
    *,
    texts: Iterable[str] | None = None,
    vocab_size: int = 384,
    seed: int = 0,
    **sizes: Any,
) -> Path:
    """Writes a random-initialised tiny model of family ``arch`` and its tokenizer to
    ``out_dir``; ``sizes`` go to ``tiny_config`` (hidden_size, num_layers, ...)."""
    import torch
    import transformers
    from transformers import PreTrainedTokenizerFast

    if arch not in _FAMILIES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts) if texts is not None else tiny_corpus()
    if arch.startswith("qwen"):
        tok = train_qwen_tokenizer(texts, vocab_size=vocab_size)
    else:
        tok = train_tokenizer(texts, vocab_size=vocab_size)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    ).save_pretrained(out)
    special = {name: tok.token_to_id(name) for name in (BOS, EOS, PAD)}
    config = tiny_config(arch, vocab_size=tok.get_vocab_size(), special_ids=special, **sizes)
    torch.manual_seed(seed)
    model = getattr(transformers, _FAMILIES[arch][1])(config).eval()
    with torch.no_grad():  # EOS a likely argmax now and then: some continuations end
        model.get_output_embeddings().weight[special[EOS]] *= 2.0
    model.save_pretrained(out, safe_serialization=True)
    (out / "rlfleet_model.json").write_text(
        json.dumps({"built_by": "rlfleet.common.architectures", "arch": arch, "seed": seed})
    )
    return out


def parameter_count(model) -> int:
    """Distinct parameters (a tied head counted once)."""
    return sum(p.numel() for p in model.parameters())
