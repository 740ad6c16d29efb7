"""The batch an Abort stopped, kept with its KV cache for the call that resumes it.

C3PO++ stops every replica at the token budget and resumes the unfinished rollouts
in the next iteration from their prefix. Re-prefilling prompt + prefix of each
costs, on CPU, about as much as decoding the step's new tokens. When the aborted
call asked for it (``Sampling.resume_kv``), the engine keeps the stopped batch as
it stands; a later call that resumes one of its sequences exactly (same seq_id,
prompt and prefix, also with ``resume_kv``) takes that row back into the running
batch and decodes on. The prefix then keeps the attention state computed under
the versions that sampled it, as sequences in flight across a weight swap do.

Only a batch stopped whole is kept, one at a time (a newer one replaces it), and
for at most ``TTL_S``; rows no call claims are dropped with it.
"""

from __future__ import annotations

import time

from rlfleet.rollout.kvbatch import KVBatch, Row


class ParkedBatch:
    TTL_S = 300.0

    def __init__(self, batch: KVBatch):
        self.batch = batch
        self.parked_at = time.monotonic()
        self._index = {row.req.seq_id: i for i, row in enumerate(batch.rows)}

    @staticmethod
    def keeps(batch: KVBatch) -> bool:
        """Whether an aborted ``batch`` (every row stopped) is worth keeping."""
        return batch.can_merge and all(row.call.sampling.resume_kv for row in batch.rows)

    def expired(self) -> bool:
        return time.monotonic() - self.parked_at > self.TTL_S

    def match(self, row: Row) -> int | None:
        """Index of the parked row that ``row`` resumes exactly, or None."""
        if not row.call.sampling.resume_kv:
            return None
        i = self._index.get(row.req.seq_id)
        if i is None:
            return None
        old = self.batch.rows[i]
        same_prompt = list(old.req.prompt_token_ids) == list(row.req.prompt_token_ids)
        if same_prompt and old.tokens == list(row.req.prefix_token_ids):
            return i
        return None

    def claim(self, picks: list[tuple[int, Row]]) -> KVBatch | None:
        """The parked rows at the picked indices, now owned by the resuming rows; the
        rest of the parked batch is dropped."""
        self._index = {}
        picks = sorted(picks, key=lambda pick: pick[0])  # the parked order: adopt keeps it
        return self.batch.adopt([i for i, _ in picks], [row for _, row in picks])
