"""Scripted models for the simulated fleet, shared by the C3PO++ driver and overlap tests.

``UNIT_COST`` makes every engine step last exactly 1 virtual second whatever the batch,
and prefill free, so a sequence of length n admitted at time t ends at t + n.
``ScriptedLengths`` fixes each sequence's length by (group, member).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlfleet.rollout.sim_engine import DecodeCostModel, LengthModel

UNIT_COST = DecodeCostModel(
    base_s=1.0, per_seq_s=0.0, per_ctx_token_s=0.0, prefill_tokens_per_s=float("inf")
)


@dataclass(frozen=True)
class ScriptedLengths(LengthModel):
    table: tuple = ()
    """((group_id, member, length), ...); unlisted sequences have length 1."""

    def output_length(self, seed: int, group: str, member: int) -> tuple[int, bool]:
        for g, m, n in self.table:
            if (g, m) == (group, member):
                return n, False
        return 1, False

    def prompt_length(self, seed: int, group: str) -> int:
        return 10
