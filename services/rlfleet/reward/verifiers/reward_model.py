"""A learned reward: a sequence-classification reward model scores the completion.

Where no rule can say what a good answer is (helpfulness, style, a preference), the
reward is what a model trained on preferences says: a Hugging Face
``AutoModelForSequenceClassification`` with one output (or several, of which
``label_index`` is read), whose logit at the last token is the score.

- What it reads: ``template`` with ``{question}`` (the task entry's ``question``) and
  ``{completion}`` (the completion cut at ``</s>``, trailing whitespace dropped; its
  leading space is kept, so ``"{question} Answer:{completion}"`` reads exactly like
  the prompt and what the policy wrote after it). ``extract = "first_line"`` gives it
  only the answer's first line instead.
- Batching: the verifier is ``batched``: the reward core hands it a request's samples
  at once and it runs the model over micro-batches of ``batch_size``, right-padded;
  longer texts are cut to ``max_length`` tokens from the left, keeping the end the
  score is read at.
- Normalisation: ``sigmoid`` maps the logit into (0, 1), the range of every other
  verifier; ``none`` passes it raw; ``standard`` gives (logit − mean) / std.
- Device and memory: the model and tokenizer load once per path and process (a
  cache shared by every request) onto CUDA when the reward service has it, else the
  CPU, in eval mode; scoring runs under ``torch.inference_mode``. A changed model at
  the same path is read only by a new process.

``check_path`` reads only ``config.json``, so the scheduler can refuse a directory
that holds no sequence classifier at submission without importing torch.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import threading
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from rlfleet.common.jobspec import check_sequence_classifier as check_path
from rlfleet.reward.verifiers.base import EOS_MARKER, Verifier, VerifierConfig, extract_answer

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(question|completion)\}")


def render(
    template: str,
    completion_text: str,
    entry: dict[str, Any],
    *,
    extract: Literal["first_line", "full"] = "full",
) -> str:
    """The text a reward model reads: ``template`` filled with the entry's question and
    the completion (see the module docstring)."""
    if extract == "first_line":
        completion = extract_answer(completion_text)
    else:
        completion = completion_text.split(EOS_MARKER, 1)[0].rstrip()
    values = {"question": str(entry.get("question", "")), "completion": completion}
    # One pass, so a question that contains "{completion}" stays as it is.
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class RewardModelConfig(VerifierConfig):
    path: str
    """Directory of a Hugging Face sequence classifier (config.json, weights, tokenizer)."""
    template: str = "{question}\n{completion}"
    """The text the model reads: ``{question}`` is the entry's question, ``{completion}``
    the completion (see the module docstring)."""
    extract: Literal["first_line", "full"] = "full"
    """full: the whole completion up to ``</s>``; first_line: its first line, stripped."""
    label_index: int = Field(default=0, ge=0)
    """Which output is the reward when the classifier has more than one label."""
    normalize: Literal["sigmoid", "none", "standard"] = "sigmoid"
    """sigmoid: the logit mapped into (0, 1); none: the raw logit; standard:
    (logit − mean) / std."""
    mean: float = 0.0
    """standard: the logit that maps to 0 (e.g. the model's mean score on the task)."""
    std: float = Field(default=1.0, gt=0)
    """standard: the logit spread that maps to 1."""
    batch_size: int = Field(default=16, ge=1, le=1024)
    """Texts per forward pass."""
    max_length: int = Field(default=1024, ge=1, le=1_048_576)
    """Tokens per text; longer texts lose their beginning."""

    @field_validator("path")
    @classmethod
    def _names_a_directory(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a model directory")
        return v

    @field_validator("template")
    @classmethod
    def _reads_the_completion(cls, v: str) -> str:
        if "{completion}" not in v:
            raise ValueError(
                "must contain the placeholder {completion}: without it the reward model "
                "never sees what it is scoring"
            )
        return v


@dataclasses.dataclass
class LoadedRewardModel:
    """A sequence classifier and its tokenizer, ready to score texts."""

    model: Any
    tokenizer: Any
    device: Any
    num_labels: int
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    """Fast tokenizers are not safe to call from two threads at once."""

    def logits(self, texts: list[str], *, max_length: int, label_index: int) -> list[float]:
        """The logit of ``label_index`` at each text's last token, in one forward pass."""
        import torch

        with self.lock:
            batch = encode(self.tokenizer, texts, max_length=max_length)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model(**batch).logits
        return out[:, label_index].float().cpu().tolist()


def encode(tokenizer: Any, texts: list[str], *, max_length: int) -> dict[str, Any]:
    """Right-padded ids and attention mask, as the verifier feeds the model (the demo
    reward model trains on the same)."""
    return dict(
        tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    )


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Right padding, left truncation, and a pad token (eos if the tokenizer has none)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("its tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


_LOAD_LOCK = threading.Lock()


def load_reward_model(path: str) -> LoadedRewardModel:
    """The model at ``path``, loaded on first use and shared after (thread-safe)."""
    with _LOAD_LOCK:
        return _load(str(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _load(path: str) -> LoadedRewardModel:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForSequenceClassification.from_pretrained(path)
    # Sequence classifiers find each row's last token by the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device).eval()
    logger.info(
        "reward model loaded",
        extra={"path": path, "device": str(device), "labels": model.num_labels},
    )
    return LoadedRewardModel(model, tokenizer, device, int(model.config.num_labels))


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class RewardModelVerifier(Verifier):
    kind: ClassVar[str] = "reward_model"
    config_model: ClassVar[type[VerifierConfig]] = RewardModelConfig
    batched: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__(config)
        c = self.config
        check_path(c.path, field="path")
        # Loaded here, before any deadline runs: a first request must not spend its
        # scoring time reading weights. A directory that cannot load is a bad setting.
        try:
            self.model = load_reward_model(c.path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"path {c.path!r} holds no loadable reward model: {exc}") from None
        if c.label_index >= self.model.num_labels:
            raise ValueError(
                f"label_index {c.label_index} is out of range: the model has "
                f"{self.model.num_labels} label(s)"
            )
        self._reads_question = "{question}" in c.template

    def check_entry(self, entry: dict[str, Any]) -> None:
        if self._reads_question and not isinstance(entry.get("question"), str):
            raise ValueError('needs a string "question" (the template reads {question})')

    def text(self, completion_text: str, entry: dict[str, Any]) -> str:
        """What the reward model reads for this sample."""
        return render(self.config.template, completion_text, entry, extract=self.config.extract)

    def normalize(self, logit: float) -> float:
        c = self.config
        if c.normalize == "sigmoid":
            return _sigmoid(logit)
        if c.normalize == "standard":
            return (logit - c.mean) / c.std
        return logit

    def logits(self, completion_texts: list[str], entries: list[dict[str, Any]]) -> list[float]:
        """The raw logit per sample, in order, over micro-batches of ``batch_size``."""
        texts = [self.text(t, e) for t, e in zip(completion_texts, entries, strict=True)]
        c, out = self.config, []
        for start in range(0, len(texts), c.batch_size):
            out += self.model.logits(
                texts[start : start + c.batch_size],
                max_length=c.max_length,
                label_index=c.label_index,
            )
        return out

    def score_batch_with_terms(
        self, completion_texts: list[str], entries: list[dict[str, Any]]
    ) -> list[tuple[float, dict[str, float]]]:
        return [(self.normalize(x), {}) for x in self.logits(completion_texts, entries)]

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        return self.score_batch_with_terms([completion_text], [entry])[0][0]
