"""Prompts in, samples out: tokenising prompts into GRPO groups and turning the
replicas' results into ``Sample`` messages.

The scheduler tokenises with the model directory's ``tokenizer.json`` through
``tokenizers`` alone, so it never imports torch or transformers; chat prompts
(``chat.py``) render the model's chat template with transformers.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlfleet.common.errors import InvalidArgument, RlfleetError
from rlfleet.common.jobspec import TaskSpec
from rlfleet.common.tasks import PromptSource, entry_to_json
from rlfleet.v1 import common_pb2, rollout_pb2


@dataclass(frozen=True)
class TextCodec:
    """A model's tokenizer plus the token ids that end a completion."""

    tokenizer: Any  # tokenizers.Tokenizer
    eos_ids: frozenset[int]
    model_path: str = ""

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def prompt_ids(self, text: str | list[dict[str, str]], task: TaskSpec) -> list[int]:
        """The prompt tokens of a task's formatted prompt: the text itself, or (chat) the
        conversation the model's chat template makes of it (``chat.py``)."""
        if task.prompt_format == "chat":
            from rlfleet.scheduler.chat import chat_prompt_ids

            return chat_prompt_ids(self.model_path, text, task.system_prompt)
        return self.encode(text)

    def completion_ids(
        self, prompt_text: str | list[dict[str, str]], completion: str, task: TaskSpec
    ) -> list[int]:
        """SFT: the target tokens after the prompt. Template prompts: the completion
        tokenised on its own, then the end-of-sequence token. Chat prompts: the assistant
        turn as the chat template closes it (``chat.py``)."""
        if task.prompt_format == "chat":
            from rlfleet.scheduler.chat import chat_completion_ids

            return chat_completion_ids(self.model_path, prompt_text, completion, task.system_prompt)
        if not self.eos_ids:
            raise InvalidArgument(
                f"model {self.model_path!r} names no end-of-sequence token; SFT targets end with one"
            )
        return [*self.encode(completion), min(self.eos_ids)]

    def completion_text(self, token_ids: list[int]) -> str:
        """The completion up to (not including) its first end-of-sequence token."""
        end = next((i for i, t in enumerate(token_ids) if t in self.eos_ids), len(token_ids))
        return self.tokenizer.decode(list(token_ids[:end]), skip_special_tokens=True)


def _eos_ids(model_dir: Path, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(v for v in value if isinstance(v, int))
    path = model_dir / "tokenizer_config.json"
    if path.is_file():
        token = json.loads(path.read_text()).get("eos_token")
        if isinstance(token, dict):  # older files store an AddedToken dict
            token = token.get("content")
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            ids.add(tokenizer.token_to_id(token))
    return frozenset(ids)


@functools.lru_cache(maxsize=8)
def load_codec(model_path: str) -> TextCodec:
    """The codec of a Hugging Face model directory (cached per path)."""
    from tokenizers import Tokenizer

    model_dir = Path(model_path)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InvalidArgument(
            f"model.path {model_path!r} has no tokenizer.json (the scheduler tokenises prompts with it)"
        )
    tokenizer = Tokenizer.from_file(str(path))
    # Prompts are sent one by one and unpadded; a saved padding/truncation
    # setting would silently change them.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return TextCodec(tokenizer, _eos_ids(model_dir, tokenizer), model_path)


@dataclass(frozen=True)
class PromptGroup:
    """One drawn prompt and the ``group_size`` sequences sampled from it."""

    serial: int
    prompt_ids: list[int]
    task_json: str
    sequences: list[rollout_pb2.SequenceRequest]

    @property
    def group_id(self) -> str:
        return group_id(self.serial)


def group_id(serial: int) -> str:
    return f"g{serial}"


def sample_id(serial: int, member: int) -> str:
    return f"{group_id(serial)}-{member}"


def make_groups(
    prompts: PromptSource,
    codec: TextCodec,
    *,
    first_serial: int,
    count: int,
    group_size: int,
) -> list[PromptGroup]:
    """Draws prompts ``first_serial .. first_serial + count - 1`` (deterministic by serial)."""
    groups = []
    for serial in range(first_serial, first_serial + count):
        text, entry = prompts.get(serial)
        ids = codec.prompt_ids(text, prompts.spec)
        if not ids:
            raise InvalidArgument(f"prompt {serial} tokenises to nothing: {text!r}")
        sequences = [
            rollout_pb2.SequenceRequest(seq_id=sample_id(serial, m), prompt_token_ids=ids)
            for m in range(group_size)
        ]
        groups.append(PromptGroup(serial, ids, entry_to_json(entry), sequences))
    return groups


def build_samples(
    groups: list[PromptGroup],
    results: dict[str, rollout_pb2.SequenceResult],
    codec: TextCodec,
    *,
    job_id: str,
    step: int,
) -> list[common_pb2.Sample]:
    """A ``Sample`` per sequence, in group order; every sequence must have a result."""
    samples = []
    for group in groups:
        for seq in group.sequences:
            result = results.get(seq.seq_id)
            if result is None:
                raise RlfleetError(f"rollout: no result came back for sequence {seq.seq_id}")
            n = len(result.token_ids)
            if len(result.logprobs) != n or len(result.versions) != n:
                raise RlfleetError(
                    f"rollout: sequence {seq.seq_id} came back with {n} tokens but "
                    f"{len(result.logprobs)} log-probs and {len(result.versions)} versions"
                )
            samples.append(
                common_pb2.Sample(
                    job_id=job_id,
                    sample_id=seq.seq_id,
                    group_id=group.group_id,
                    step=step,
                    prompt_token_ids=group.prompt_ids,
                    completion_token_ids=result.token_ids,
                    inference_logprobs=result.logprobs,
                    token_versions=result.versions,
                    finish_reason=result.finish_reason,
                    completion_text=codec.completion_text(list(result.token_ids)),
                    task_json=group.task_json,
                )
            )
    return samples
