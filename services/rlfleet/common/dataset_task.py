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
                halves = data.train_test_split(test_size=spec.eval_fraction, seed=seed)
                data = halves["test" if part == "eval" else "train"]
            elif part == "eval":
                raise ValueError("task.dataset has no eval part: set eval_split or eval_fraction")
        for field, column in (("prompt_column", spec.prompt_column),
                              ("answer_column", spec.answer_column)):  # fmt: skip
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
