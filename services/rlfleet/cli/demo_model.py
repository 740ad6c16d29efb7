"""The demo's base model: a tiny Llama that already half-knows the task.

RL can only reinforce what the policy sometimes does right. A randomly
initialised model never earns reward on basic_arithmetic, so `rlfleet demo`
would show a flat line; a model trained to convergence leaves nothing to learn.
This module builds the middle ground, offline and in well under a minute on
two CPU cores: a byte-level BPE tokenizer and a ~150k-parameter Llama, then a
short supervised warm start on the demo's task distribution.

Why the warm start mixes two answer styles. A tiny model under GRPO with a
fresh AdamW (no warm-up) improves its *arithmetic* only slowly: each fact is
learnt prompt by prompt, and learning rates high enough to go faster wreck the
model in the first, sign-like Adam steps. Measured in-process with a warm start
of this size on terse answers only: +0.02 to +0.16 mean reward over 40-100
steps (lr 3e-4 to 1e-3; 2e-3 and up collapsed to ~0.05). What GRPO learns
within a few dozen steps is a behaviour shared by every prompt. So the warm
start answers in the terse style the verifier grades (" 12</s>") only ~30% of
the time and otherwise in a wordy style (" The answer is 12.</s>"), to which
reasoning-gym's scorer gives only partial credit (len(answer) / len(text)).
The demo's policy then starts at ~0.2 mean reward (greedy: 0.1) and GRPO lifts
it by ~0.3 within 40 steps (greedy: 0.8-0.9): it drops the wordy style and
sharpens the arithmetic on the way. This is the ordinary shape of RL
post-training: the base model half-follows the answer format, the reward
teaches the rest.

The result is cached under ``cache_dir`` keyed by a hash of every setting that
shapes it, and written to a temporary directory that is renamed into place, so
an interrupted build never leaves a half-written model behind and a second
call returns at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_TASK_NAME = "basic_arithmetic"
DEMO_TASK_PARAMS: dict[str, Any] = {
    "min_terms": 2,
    "max_terms": 2,
    "min_digits": 1,
    "max_digits": 1,
    "operators": ["+", "-"],
    "allow_parentheses": False,
    "allow_negation": False,
}
"""reasoning-gym basic_arithmetic parameters of the demo job: "Calculate 7 - 9."
(two single-digit terms, + and -). examples/demo_arithmetic.toml uses the same."""
DEMO_PROMPT_TEMPLATE = "{question} Answer:"
"""TaskSpec.prompt_template of the demo job; the warm start uses the same prompts."""

TERSE_ANSWER = " {answer}"
WORDY_ANSWER = " The answer is {answer}."

# Bump when the build code changes in a way the settings below do not capture,
# so caches built by older code are not reused.
_BUILD_FORMAT = 1

BUILD_SETTINGS: dict[str, Any] = {
    "format": _BUILD_FORMAT,
    "task": DEMO_TASK_NAME,
    "task_params": DEMO_TASK_PARAMS,
    "prompt_template": DEMO_PROMPT_TEMPLATE,
    "terse_answer": TERSE_ANSWER,
    "wordy_answer": WORDY_ANSWER,
    # Share of warm-start targets in the wordy style (see the module docstring).
    "wordy_fraction": 0.7,
    "vocab_size": 512,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "max_positions": 128,
    "corpus_size": 4000,
    "corpus_seed": 12345,
    "sft_seed": 777,
    "sft_pool_size": 4096,
    "sft_steps": 400,
    "sft_batch_size": 64,
    "sft_lr": 3e-3,
    "sft_warmup_steps": 30,
    "seed": 0,
}
"""Everything that shapes the built model; its hash names the cache entry."""

MODEL_INFO_FILE = "rlfleet_model.json"

Progress = Callable[[str], None]


def settings_key(settings: dict[str, Any]) -> str:
    """A short stable hash of ``settings`` (the cache entry's name)."""
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_demo_model(
    cache_dir: Path,
    *,
    progress: Progress | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Returns the directory of the demo's base model, building it on first use.

    The model (``config.json``, safetensors weights, ``tokenizer.json``) lands in
    ``cache_dir/demo-model-<hash of settings>``; later calls with the same
    settings return that directory without touching it.
    """
    settings = dict(BUILD_SETTINGS if settings is None else settings)
    say = progress or (lambda msg: logger.info("%s", msg))
    return build_cached(
        cache_dir, f"demo-model-{settings_key(settings)}", MODEL_INFO_FILE,
        lambda out: _build(out, settings, say), say=say, what="base model",
    )  # fmt: skip


def build_cached(
    cache_dir: Path, name: str, info_file: str, build: Callable[[Path], None], *,
    say: Progress, what: str,
) -> Path:  # fmt: skip
    """``cache_dir/name``, built by ``build(tmp)`` into a temporary directory that is renamed
    into place (so an interrupted build never leaves a half-written model) unless a
    finished one (with ``info_file``) is already there."""
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / name
    if (target / info_file).is_file():
        say(f"cached {what} found ({target.name})")
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".building-{name}-", dir=cache_dir))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is meant to be shared
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished the same build first: theirs is identical.
            if not (target / info_file).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(out: Path, s: dict[str, Any], say: Progress) -> None:
    import reasoning_gym
    import torch

    started = time.monotonic()
    threads_before = torch.get_num_threads()
    # One thread: the matrices are far too small to gain from more, and on a busy
    # 2-core machine OpenMP threads that spin on each other's barriers made the
    # build 20x slower (measured: 60 steps in 3 s of CPU with one thread, 54 s
    # with two).
    torch.set_num_threads(1)
    try:
        make = reasoning_gym.create_dataset
        corpus = list(
            make(s["task"], size=s["corpus_size"], seed=s["corpus_seed"], **s["task_params"])
        )
        say("training the tokenizer")
        tok = _save_tokenizer(out, corpus, s)
        say(
            f"warm-starting a {s['hidden_size']}-wide, {s['num_layers']}-layer Llama "
            f"({s['sft_steps']} supervised steps)"
        )
        model = _warm_start(tok, s, say)
        model.save_pretrained(out, safe_serialization=True)
        info = {"built_by": __name__, "settings": s, "settings_key": settings_key(s)}
        (out / MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    finally:
        torch.set_num_threads(threads_before)
    say(f"base model built in {time.monotonic() - started:.0f} s")


def _save_tokenizer(out: Path, corpus: list[dict[str, Any]], s: dict[str, Any]):
    from transformers import PreTrainedTokenizerFast

    from rlfleet.common.tinymodel import BOS, EOS, PAD, train_tokenizer

    texts = []
    for e in corpus:
        prompt = s["prompt_template"].format(question=e["question"])
        for style in (s["terse_answer"], s["wordy_answer"]):
            texts.append(prompt + style.format(answer=e["answer"]))
    tok = train_tokenizer(texts, vocab_size=s["vocab_size"])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    ).save_pretrained(out)
    return tok


def _warm_start(tok, s: dict[str, Any], say: Progress):
    """Supervised training on prompt + answer + EOS, loss on the answer tokens only.

    Prompts and answers are tokenised separately, exactly as the fleet sees them:
    the scheduler encodes the prompt alone (no BOS) and the model continues it.
    """
    import reasoning_gym
    import torch
    from transformers import LlamaForCausalLM

    from rlfleet.common.tinymodel import EOS, PAD, llama_config

    eos, pad = tok.token_to_id(EOS), tok.token_to_id(PAD)
    torch.manual_seed(s["seed"])
    config = llama_config(tok, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                          num_heads=s["num_heads"], max_positions=s["max_positions"])  # fmt: skip
    model = LlamaForCausalLM(config)
    model.train()

    # A pool of questions drawn once; with these task settings it covers every
    # distinct problem many times over.
    pool = reasoning_gym.create_dataset(
        s["task"], size=s["sft_pool_size"], seed=s["sft_seed"], **s["task_params"]
    )
    examples = [
        (
            tok.encode(s["prompt_template"].format(question=e["question"])).ids,
            tok.encode(s["terse_answer"].format(answer=e["answer"])).ids + [eos],
            tok.encode(s["wordy_answer"].format(answer=e["answer"])).ids + [eos],
        )
        for e in pool
    ]
    rng = random.Random(s["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["sft_lr"], weight_decay=0.0)
    steps, warmup = s["sft_steps"], s["sft_warmup_steps"]
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = s["sft_lr"] * min(1.0, (step + 1) / warmup)
        batch = []
        for _ in range(s["sft_batch_size"]):
            prompt, terse, wordy = examples[rng.randrange(len(examples))]
            batch.append((prompt, wordy if rng.random() < s["wordy_fraction"] else terse))
        ids, attention, targets = _pack(batch, pad=pad)
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            say(f"warm start step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return model


def _pack(batch: list[tuple[list[int], list[int]]], *, pad: int):
    """Right-padded ids, attention mask and targets (-100 outside the answer)."""
    import torch

    width = max(len(p) + len(a) for p, a in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    targets = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (prompt, answer) in enumerate(batch):
        seq = prompt + answer
        ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        targets[i, len(prompt) : len(seq)] = torch.tensor(answer)
    return ids, attention, targets
