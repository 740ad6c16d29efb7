"""Prompts from the user's own data (``task.kind = "dataset"``), read with ``datasets``.

A JSONL/JSON, Parquet or CSV file, a directory written by ``Dataset.save_to_disk``,
or (where the network allows; untested here) a Hugging Face Hub dataset by name.
Each row becomes a task entry: every column as it is, plus ``question`` (the
prompt column) and ``answer`` (the ground-truth column), which the prompt template
and the verifiers read (``answer_regex`` picks the ground truth out of a worked
solution, as GSM8K's "#### 72"). The rows are split (a named eval split, or a seeded
held-out fraction) and shuffled with the task's seed once, so index i names the
same row after any restart: the scheduler resumes jobs by step, and C3PO++ by
prompt serial.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from rlfleet.common.jobspec import DatasetSpec

_SUFFIX_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def resolve_format(spec: DatasetSpec) -> str:
    """The reader for ``spec.path``: json, parquet, csv, disk (save_to_disk) or hub."""
    if spec.format != "auto":
        return spec.format
    path = Path(spec.path).expanduser()
    if path.is_dir():
        return "disk"
    if path.suffix.lower() in _SUFFIX_FORMATS:
        if not path.is_file():
            raise ValueError(f"task.dataset.path {spec.path!r}: no such file")
        return _SUFFIX_FORMATS[path.suffix.lower()]
    if path.exists():
        raise ValueError(
            f"task.dataset.path {spec.path!r}: cannot tell its format from the name; "
            "set task.dataset.format (json, parquet, csv, disk)"
        )
    return "hub"


def _load(spec: DatasetSpec, split: str):
    import datasets

    fmt = resolve_format(spec)
    path = str(Path(spec.path).expanduser()) if fmt != "hub" else spec.path
    try:
        if fmt == "disk":
            data = datasets.load_from_disk(path)
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise ValueError(
                        f"task.dataset: split {split!r} is not in {spec.path!r} "
                        f"(splits: {', '.join(data)})"
                    )
                data = data[split]
            elif split != spec.split:
                raise ValueError(
                    f"task.dataset: {spec.path!r} holds one split; use eval_fraction "
                    f"instead of eval_split {split!r}"
                )
            return data
        if fmt == "hub":
            return datasets.load_dataset(path, split=split)
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            raise ValueError(f"task.dataset.path {spec.path!r} is empty: it holds no rows")
        if split != spec.split:
            raise ValueError(
                f"task.dataset: a {fmt} file holds one split; use eval_fraction "
                f"instead of eval_split {split!r}"
            )
        return datasets.load_dataset(fmt, data_files=path, split="train")
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is the user's input
        where = "the Hugging Face Hub" if fmt == "hub" else f"a {fmt} reader"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"task.dataset.path {spec.path!r}: cannot be read with {where}: {reason}"
        ) from None


class DatasetEntries:
    """Task entries of one part ("train" or "eval") of the user's dataset, in a seeded
    order; ``entries[i]`` is a dict with ``question``, ``answer`` and every column."""

    def __init__(self, spec: DatasetSpec, *, seed: int, part: str = "train"):
        self.spec = spec
        if part == "eval" and spec.eval_split:
            data = _load(spec, spec.eval_split)
        else:
            data = _load(spec, spec.split)
            if spec.eval_fraction > 0:
                held_out = round(len(data) * spec.eval_fraction)
                if not 0 < held_out < len(data):
                    raise ValueError(
                        f"task.dataset.eval_fraction {spec.eval_fraction} of {len(data)} rows "
                        f"leaves the {'eval' if held_out == 0 else 'train'} part of "
                        f"{spec.path!r} with no rows"
                    )
                halves = data.train_test_split(test_size=held_out, seed=seed)
                data = halves["test" if part == "eval" else "train"]
            elif part == "eval":
                raise ValueError("task.dataset has no eval part: set eval_split or eval_fraction")
        columns = (
            ("messages_column", spec.messages_column)
            if spec.messages_column
            else ("prompt_column", spec.prompt_column),
            # A conversation dataset may carry no ground truth (SFT, reward models).
            ("answer_column", "" if spec.messages_column else spec.answer_column),
            ("completion_column", spec.completion_column),
        )
        for field, column in columns:
            if not column:
                continue
            if column not in data.column_names:
                raise ValueError(
                    f"task.dataset.{field} {column!r} is not a column of {spec.path!r} "
                    f"(columns: {', '.join(data.column_names)})"
                )
        if len(data) == 0:
            raise ValueError(f"task.dataset: the {part} part of {spec.path!r} has no rows")
        self.rows = data.shuffle(seed=seed) if spec.shuffle else data

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = dict(self.rows[index])
        if self.spec.messages_column:
            return self._conversation(index, row)
        question, answer = row[self.spec.prompt_column], row[self.spec.answer_column]
        if not isinstance(question, str) or not question:
            raise ValueError(
                f"task.dataset: row {index} has no prompt text in {self.spec.prompt_column!r}"
            )
        if self.spec.answer_regex:
            found = re.search(self.spec.answer_regex, str(answer), re.MULTILINE)
            if found is None:
                raise ValueError(
                    f"task.dataset.answer_regex {self.spec.answer_regex!r} finds nothing in "
                    f"row {index}'s {self.spec.answer_column!r}: {str(answer)[-80:]!r}"
                )
            answer = found.group(1).strip()
        return {**row, "question": question, "answer": answer}

    def _conversation(self, index: int, row: dict[str, Any]) -> dict[str, Any]:
        """A messages row: ``prompt_messages`` (up to the last user turn) and ``question``
        (that turn's text, for verifiers and reward-model templates). A *transcript* (tool
        turns, or several assistant turns: an agent's demonstration) has its prompt end
        before the first assistant turn, and the rest in ``transcript`` (SFT learns every
        assistant turn of it)."""
        messages = _messages(row[self.spec.messages_column], index, self.spec.messages_column)
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        transcript = len(assistants) > 1 or any(m["role"] == "tool" for m in messages)
        if transcript:
            prompt = messages[: assistants[0]] if assistants else messages
        else:
            prompt = messages[:-1] if messages[-1]["role"] == "assistant" else messages
        if not prompt or prompt[-1]["role"] != "user":
            raise ValueError(
                f"task.dataset: row {index}'s {self.spec.messages_column!r} has no user turn "
                "before its end (the prompt ends with the user's message)"
            )
        entry = {**row, "question": prompt[-1]["content"], "prompt_messages": prompt}
        if transcript:
            entry["transcript"] = messages[len(prompt) :]
        answer = row.get(self.spec.answer_column)
        if answer is not None and self.spec.answer_regex:
            found = re.search(self.spec.answer_regex, str(answer), re.MULTILINE)
            answer = found.group(1).strip() if found else answer
        if answer is not None:
            entry["answer"] = answer
        return entry

    def completion(self, index: int) -> str:
        """The SFT target of row ``index``: the completion column, a conversation's final
        assistant turn, else the raw answer."""
        if self.spec.messages_column and not self.spec.completion_column:
            messages = _messages(self.rows[index][self.spec.messages_column], index,
                                 self.spec.messages_column)  # fmt: skip
            if messages[-1]["role"] != "assistant":
                raise ValueError(
                    f"task.dataset: row {index}'s {self.spec.messages_column!r} does not end "
                    "with an assistant turn to learn (SFT)"
                )
            return messages[-1]["content"]
        column = self.spec.completion_column or self.spec.answer_column
        text = self.rows[index][column]
        if not isinstance(text, str) or not text:
            raise ValueError(f"task.dataset: row {index} has no completion text in {column!r}")
        return text


def _messages(value: Any, index: int, column: str) -> list[dict[str, str]]:
    """A row's conversation, checked: a non-empty list of {"role", "content"} strings."""
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise ValueError(
            f"task.dataset: row {index}'s {column!r} is not a list of chat messages "
            '({"role": ..., "content": ...})'
        )
    # A tool result keeps its ``name`` (some templates render it), as an episode's does.
    return [
        {"role": m["role"], "content": m["content"]}
        | ({"name": m["name"]} if isinstance(m.get("name"), str) and m["name"] else {})
        for m in value
    ]
