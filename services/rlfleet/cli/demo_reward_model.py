"""A tiny reward model for the demo task, built offline: a learned reward to try the
``reward_model`` verifier on without downloading one.

It is a ``LlamaForSequenceClassification`` (one label; 64 wide, 2 layers, like the
demo's base model) that reads the base model's tokenizer (its files are copied), so
it scores exactly the text the policy produces. It is trained with the
Bradley–Terry loss, −log σ(r_chosen − r_rejected), on preference pairs over
reasoning-gym basic_arithmetic with the demo's parameters ("Calculate 7 - 9."):
the chosen completion is the terse correct answer (" -2"), the rejected one either
the wordy correct answer (" The answer is -2.") or a wrong number (the answer ± 1
to 3). Every text is what the verifier renders with ``DEMO_RM_TEMPLATE``
("{question} Answer:{completion}"), so a job that scores with this model uses that
template too.

What it prefers (600 steps of 32 pairs, 9 in 10 with a wrong number; measured with
the demo base model's tokenizer, pairs over the 48 of the task's 242 distinct
questions held out of training): terse over wordy on 100 % of pairs, the right
number over a wrong one on 72 % (on the 194 training questions: 95 %). The answer
style is learnt at once; the arithmetic is mostly memorised and only partly
generalises (other seeds, i.e. other splits, gave 60-88 % on held-out questions), so
on the demo's own questions it ranks right answers well, and it is no substitute for
a rule on anything else. Each build records its own figures in
``rlfleet_reward_model.json`` (``heldout_accuracy``, ``train_accuracy``).

The result is cached under ``cache_dir`` keyed by a hash of its settings and of the
base tokenizer, built in a temporary directory renamed into place (as the demo
model is, ``demo_model.py``): about 20-30 s on two busy CPU cores, one thread.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

from rlfleet.cli.demo_model import (
    DEMO_TASK_NAME,
    DEMO_TASK_PARAMS,
    TERSE_ANSWER,
    WORDY_ANSWER,
    Progress,
    build_cached,
    settings_key,
)

logger = logging.getLogger(__name__)

DEMO_RM_TEMPLATE = "{question} Answer:{completion}"
"""``reward_model.template`` for this model: the demo prompt ("{question} Answer:")
followed by the completion as the policy wrote it."""
WRONG_ANSWER = " {wrong}"

_BUILD_FORMAT = 1

RM_BUILD_SETTINGS: dict[str, Any] = {
    "format": _BUILD_FORMAT,
    "task": DEMO_TASK_NAME,
    "task_params": DEMO_TASK_PARAMS,
    "template": DEMO_RM_TEMPLATE,
    "chosen": TERSE_ANSWER,
    "wordy": WORDY_ANSWER,
    "wrong": WRONG_ANSWER,
    "wrong_offsets": [1, 2, 3],
    # Share of training pairs whose rejected side is a wrong number; the wordy style
    # is learnt from few examples, the arithmetic needs the rest (0.75 left the
    # held-out wrong-number pairs near chance).
    "wrong_fraction": 0.9,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "max_positions": 128,
    "max_length": 64,
    "pool_size": 4000,
    "pool_seed": 4242,
    "heldout_fraction": 0.2,
    "steps": 600,
    "batch_pairs": 32,
    "lr": 1e-3,
    "warmup_steps": 30,
    "seed": 0,
}
"""Everything that shapes the built model (with the base tokenizer's hash, its cache key)."""

RM_INFO_FILE = "rlfleet_reward_model.json"

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
)


def _tokenizer_files(base_model_dir: Path) -> list[Path]:
    files = [base_model_dir / name for name in _TOKENIZER_FILES]
    files = [f for f in files if f.is_file()]
    if not files:
        raise ValueError(f"{base_model_dir} holds no tokenizer files to copy")
    return files


def _tokenizer_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def prepare_demo_reward_model(
    cache_dir: Path,
    *,
    base_model_dir: Path,
    progress: Progress | None = None,
    settings: dict[str, Any] | None = None,
) -> Path:
    """Returns the directory of the demo reward model, building it on first use.

    The model (``config.json``, safetensors weights, the base model's tokenizer files,
    ``rlfleet_reward_model.json``) lands in ``cache_dir/demo-rm-<hash>``; later calls
    with the same settings and base tokenizer return it without touching it.
    """
    settings = dict(RM_BUILD_SETTINGS if settings is None else settings)
    say = progress or (lambda msg: logger.info("%s", msg))
    base_model_dir = Path(base_model_dir).expanduser()
    files = _tokenizer_files(base_model_dir)
    settings["base_tokenizer"] = _tokenizer_digest(files)

    def build(out: Path) -> None:
        for f in files:
            shutil.copyfile(f, out / f.name)
        _build(out, settings, say)

    return build_cached(
        cache_dir, f"demo-rm-{settings_key(settings)}", RM_INFO_FILE, build, say=say,
        what="reward model",
    )  # fmt: skip


def _pairs(s: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Distinct (question, answer) entries, split into training and held-out questions."""
    import reasoning_gym

    pool = reasoning_gym.create_dataset(
        s["task"], size=s["pool_size"], seed=s["pool_seed"], **s["task_params"]
    )
    distinct = {e["question"]: {"question": e["question"], "answer": e["answer"]} for e in pool}
    entries = [distinct[q] for q in sorted(distinct)]
    random.Random(s["seed"]).shuffle(entries)
    n_heldout = max(1, round(len(entries) * s["heldout_fraction"]))
    return entries[n_heldout:], entries[:n_heldout]


def _text(s: dict[str, Any], entry: dict[str, Any], completion: str) -> str:
    from rlfleet.reward.verifiers.reward_model import render

    # Exactly what the verifier reads for this completion (as it would end: "</s>").
    return render(s["template"], completion + "</s>", entry)


def _chosen(s: dict[str, Any], e: dict[str, Any]) -> str:
    return _text(s, e, s["chosen"].format(answer=e["answer"]))


def _wordy(s: dict[str, Any], e: dict[str, Any]) -> str:
    return _text(s, e, s["wordy"].format(answer=e["answer"]))


def _wrong(s: dict[str, Any], e: dict[str, Any], offset: int) -> str:
    return _text(s, e, s["wrong"].format(wrong=int(e["answer"]) + offset))


def _build(out: Path, s: dict[str, Any], say: Progress) -> None:
    import torch

    started = time.monotonic()
    threads_before = torch.get_num_threads()
    # One thread, as for the demo model: on a busy 2-core machine more made it slower.
    torch.set_num_threads(1)
    try:
        train, heldout = _pairs(s)
        say(
            f"training a {s['hidden_size']}-wide, {s['num_layers']}-layer reward model "
            f"({s['steps']} Bradley-Terry steps on {len(train)} questions)"
        )
        model, tok = _train(out, s, train, say)
        accuracy = _accuracy(model, tok, s, heldout)
        seen = _accuracy(model, tok, s, train)
        model.save_pretrained(out, safe_serialization=True)
        info = {
            "built_by": __name__,
            "settings": s,
            "settings_key": settings_key(s),
            "template": s["template"],
            "heldout_questions": len(heldout),
            "heldout_accuracy": accuracy,
            "train_questions": len(train),
            "train_accuracy": seen,
        }
        (out / RM_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    finally:
        torch.set_num_threads(threads_before)
    say(
        f"reward model built in {time.monotonic() - started:.0f} s; held-out pairwise "
        f"accuracy: terse over wordy {accuracy['wordy']:.2f}, right over wrong "
        f"{accuracy['wrong']:.2f}"
    )


def _train(out: Path, s: dict[str, Any], train: list[dict[str, Any]], say: Progress):
    """Bradley–Terry: minimise −log σ(r_chosen − r_rejected) over sampled pairs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rlfleet.reward.verifiers.reward_model import encode, prepare_tokenizer

    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(out))
    torch.manual_seed(s["seed"])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=s["hidden_size"],
        intermediate_size=s["hidden_size"] * 4,
        num_hidden_layers=s["num_layers"],
        num_attention_heads=s["num_heads"],
        num_key_value_heads=s["num_heads"],
        max_position_embeddings=s["max_positions"],
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_labels=1,
    )
    model = LlamaForSequenceClassification(config)
    model.train()
    rng = random.Random(s["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.0)
    offsets = [sign * k for k in s["wrong_offsets"] for sign in (1, -1)]
    steps, warmup = s["steps"], s["warmup_steps"]
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = s["lr"] * min(1.0, (step + 1) / warmup)
        chosen, rejected = [], []
        for _ in range(s["batch_pairs"]):
            e = train[rng.randrange(len(train))]
            chosen.append(_chosen(s, e))
            if rng.random() < s["wrong_fraction"]:
                rejected.append(_wrong(s, e, rng.choice(offsets)))
            else:
                rejected.append(_wordy(s, e))
        batch = encode(tok, chosen + rejected, max_length=s["max_length"])
        rewards = model(**batch).logits[:, 0]
        margin = rewards[: len(chosen)] - rewards[len(chosen) :]
        loss = -torch.nn.functional.logsigmoid(margin).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            say(f"reward model step {step + 1}/{steps}: loss {loss.item():.3f}")
    model.eval()
    return model, tok


def _accuracy(model, tok, s: dict[str, Any], heldout: list[dict[str, Any]]) -> dict[str, float]:
    """Share of pairs over these questions where the chosen text scores higher, per
    rejected kind: wordy (one pair per question) and wrong (one per offset ± 1..3)."""
    import torch

    from rlfleet.reward.verifiers.reward_model import encode

    def scores(texts: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(texts), 64):
            batch = encode(tok, texts[i : i + 64], max_length=s["max_length"])
            with torch.inference_mode():
                out += model(**batch).logits[:, 0].tolist()
        return out

    offsets = [sign * k for k in s["wrong_offsets"] for sign in (1, -1)]
    questions = [e["question"] for e in heldout]
    chosen = dict(zip(questions, scores([_chosen(s, e) for e in heldout]), strict=True))
    wordy = scores([_wordy(s, e) for e in heldout])
    wrong_pairs = [(e, k) for e in heldout for k in offsets]
    wrong = scores([_wrong(s, e, k) for e, k in wrong_pairs])
    wins_wordy = sum(chosen[e["question"]] > r for e, r in zip(heldout, wordy, strict=True))
    wins_wrong = sum(
        chosen[e["question"]] > r for (e, _), r in zip(wrong_pairs, wrong, strict=True)
    )
    return {
        "wordy": round(wins_wordy / len(heldout), 4),
        "wrong": round(wins_wrong / len(wrong_pairs), 4),
    }
