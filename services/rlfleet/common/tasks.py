"""Prompt sources. A task turns an index into (prompt text, task entry); the
entry travels with the sample (as JSON) so the reward service can score it.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from rlfleet.common.jobspec import TaskSpec


@functools.cache
def known_task_names() -> frozenset[str]:
    import reasoning_gym.factory as factory

    return frozenset(factory.DATASETS)


class PromptSource:
    """Deterministic prompts for a job; index i always yields the same prompt.

    Entries come from a reasoning-gym dataset or from the user's own data
    (``dataset_task.DatasetEntries``); both are indexable sequences of dicts with a
    ``question``, which the prompt template formats."""

    def __init__(self, spec: TaskSpec, *, part: str = "train"):
        self.spec = spec
        if spec.kind == "dataset":
            from rlfleet.common.dataset_task import DatasetEntries

            self.dataset = DatasetEntries(spec.dataset, seed=spec.seed, part=part)
        else:
            import reasoning_gym

            # The eval part of a procedural task is a second draw with the next seed.
            seed = spec.seed + (1 if part == "eval" else 0)
            self.dataset = reasoning_gym.create_dataset(
                spec.name, size=spec.size, seed=seed, **spec.params
            )

    def __len__(self) -> int:
        return len(self.dataset)

    def get(self, index: int) -> tuple[str | list[dict[str, str]], dict[str, Any]]:
        """The prompt (the formatted text; for a conversation dataset its messages) and
        the task entry."""
        entry = self.dataset[index % len(self.dataset)]
        if "prompt_messages" in entry:
            return entry["prompt_messages"], entry
        return self.spec.prompt_template.format(question=entry["question"]), entry

    def completion(self, index: int) -> str:
        """SFT: the target completion of prompt ``index`` (datasets only)."""
        return self.dataset.completion(index % len(self.dataset))


def entry_to_json(entry: dict[str, Any]) -> str:
    # reasoning-gym metadata may hold tuples; JSON turns them into lists, which
    # its scorers accept.
    return json.dumps(entry, default=str)


@functools.lru_cache(maxsize=64)
def dataset_for_scoring(name: str):
    """A dataset instance whose ``score_answer`` the reward service calls."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=1, seed=0)
