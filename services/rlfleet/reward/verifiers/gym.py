"""The task's own scorer: reasoning-gym datasets know how to grade their answers
(partial credit included), so the reward is exactly what the task defines.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rlfleet.common.tasks import dataset_for_scoring, known_task_names
from rlfleet.reward.verifiers.base import Verifier


class ReasoningGymVerifier(Verifier):
    kind: ClassVar[str] = "reasoning_gym"

    def check_entry(self, entry: dict[str, Any]) -> None:
        metadata = entry.get("metadata")
        name = metadata.get("source_dataset") if isinstance(metadata, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError('needs "metadata.source_dataset" (the reasoning-gym dataset name)')
        if name not in known_task_names():
            raise ValueError(f"names unknown reasoning-gym dataset {name!r}")
        if "answer" not in entry:
            raise ValueError('needs an "answer" (the gold answer)')

    def score(self, completion_text: str, entry: dict[str, Any]) -> float:
        dataset = dataset_for_scoring(entry["metadata"]["source_dataset"])
        return float(dataset.score_answer(self.answer(completion_text), entry))
