"""A batch of live sequences and their KV cache, kept dense as sequences come and go.

Rows are left-padded so every row's next token sits in the last column; each row
carries its own position ids, so padding never shifts a sequence's positions.
Three operations keep the batch small: ``select`` drops finished rows (and trims
padding columns no live row uses), ``merge`` appends newly prefilled rows
(left-padding whichever cache is shorter), and ``decode`` advances all rows by one
token. Trimming and merging edit the cache tensors of plain ``DynamicLayer``
layers; models whose cache has other layer kinds (sliding windows, linear
attention) still work, they just do not take in new rows mid-batch.

Plain layers are ``RoomyLayer``s: transformers' ``DynamicLayer`` concatenates the
whole cache with each new token, so one decode step copied B × S × layers of
keys and values, which at a few hundred rows of a few hundred tokens was half of
a step's time on CPU. A roomy layer keeps its keys and values as views into a
buffer with spare columns and writes each new token into place. Its buffer also
has spare rows: a merged batch no wider than the running one is written into them
(``append_rows``), so a refill copies its own rows, not the whole cache (under
C3PO++ refills arrive a dozen times a step, and copying the cache on each was a
sixth of a replica's engine time).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from rlfleet.rollout.engine import SeqRequest
from rlfleet.rollout.sampling import sample_next


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` that appends in place: ``keys``/``values`` are views of
    buffers with room for more columns (tokens) and more rows (sequences). Anything
    that replaces ``keys``/``values`` (trimming padding, merging a wider batch) simply
    makes the next update move them into a new buffer, which is the copy
    ``DynamicLayer`` makes every step.

    Buffers are allocated uninitialised: a column is written before a view covers it,
    and left-padding columns are zeroed where they are made (attention masks them,
    but a masked NaN would still poison the weighted sum)."""

    ROOM = 64
    """Spare columns at least; a buffer also grows by half its length."""
    ROW_ROOM = 0.5
    """Spare rows, as a share of the rows (at least ``MIN_ROW_ROOM``): newly prefilled
    sequences join in them (``append_rows``) instead of a copy of the whole cache."""
    MIN_ROW_ROOM = 8

    def __init__(self):
        super().__init__()
        self._kbuf: torch.Tensor | None = None
        self._vbuf: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, new, rows = self.get_seq_length(), key_states.shape[-2], key_states.shape[0]
        if not self._owns(n, key_states) or self._kbuf.shape[-2] < n + new:
            capacity = n + new + max(self.ROOM, (n + new) // 2)
            old_k, old_v = self.keys, self.values
            self._alloc(rows, capacity, key_states, value_states)
            if n:
                self._kbuf[:rows, :, :n] = old_k
                self._vbuf[:rows, :, :n] = old_v
        self._kbuf[:rows, :, n : n + new] = key_states
        self._vbuf[:rows, :, n : n + new] = value_states
        self._view(rows, n + new)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keeps the rows at ``indices`` (with room for more rows again)."""
        n = self.get_seq_length()
        if not (n and self._owns(n, self.keys)):
            super().batch_select_indices(indices)
            return
        kb, vb = self._kbuf, self._vbuf
        rows = len(indices)
        self._alloc(rows, kb.shape[-2], kb, vb)
        self._kbuf[:rows, :, :n] = kb[:, :, :n].index_select(0, indices)
        self._vbuf[:rows, :, :n] = vb[:, :, :n].index_select(0, indices)
        self._view(rows, n)

    def spare_rows(self) -> int:
        """Rows the buffers can still take without a new allocation (0 if not owned)."""
        n = self.get_seq_length()
        return self._kbuf.shape[0] - self.keys.shape[0] if n and self._owns(n, self.keys) else 0

    def append_rows(self, other: DynamicLayer, grow_other: int) -> None:
        """Writes ``other``'s rows into spare rows, left-padded by ``grow_other`` columns
        to this layer's width: one copy of the new rows, none of the old."""
        rows, width = self.keys.shape[0], self.keys.shape[-2]
        self._write_rows(rows, other.keys, other.values, grow_other, width)
        self._view(rows + other.keys.shape[0], width)

    def absorb(self, other: DynamicLayer, grow: int, grow_other: int) -> None:
        """Appends ``other``'s rows, left-padding this layer's columns by ``grow`` and
        ``other``'s by ``grow_other``, in one copy into a new buffer with room (padding
        and concatenating, then making room at the next update, copied three times)."""
        k, v = self.keys, self.values
        rows, width = k.shape[0], k.shape[-2] + grow
        self._alloc(rows + other.keys.shape[0], width + max(self.ROOM, width // 2), k, v)
        self._write_rows(0, k, v, grow, width)
        self._view(rows, width)
        self.append_rows(other, grow_other)

    def _write_rows(
        self, at: int, keys: torch.Tensor, values: torch.Tensor, pad: int, width: int
    ) -> None:
        """Buffer rows ``at`` on: ``pad`` zero columns, then ``keys``/``values``."""
        end = at + keys.shape[0]
        for buf, new in ((self._kbuf, keys), (self._vbuf, values)):
            buf[at:end, :, :pad] = 0
            buf[at:end, :, pad:width] = new

    def _owns(self, n: int, like: torch.Tensor) -> bool:
        """Whether ``keys``/``values`` are the first rows and ``n`` columns of our buffers,
        with as many rows as ``like``."""
        kb, vb = self._kbuf, self._vbuf
        if kb is None or vb is None or n == 0:
            return False
        return (
            self.keys.data_ptr() == kb.data_ptr()
            and self.values.data_ptr() == vb.data_ptr()
            and self.keys.shape[0] == like.shape[0] <= kb.shape[0]
            and self.keys.shape[1] == kb.shape[1] == like.shape[1]
            and self.keys.stride() == kb.stride()
            and self.values.stride() == vb.stride()
        )

    def _alloc(self, rows: int, capacity: int, k_like: torch.Tensor, v_like: torch.Tensor):
        total = rows + max(self.MIN_ROW_ROOM, int(rows * self.ROW_ROOM))
        self._kbuf = k_like.new_empty((total, k_like.shape[1], capacity, k_like.shape[-1]))
        self._vbuf = v_like.new_empty((total, v_like.shape[1], capacity, v_like.shape[-1]))

    def _view(self, rows: int, width: int) -> None:
        self.keys, self.values = self._kbuf[:rows, :, :width], self._vbuf[:rows, :, :width]


def roomy_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose plain layers append in place."""
    cache = DynamicCache(config=config)
    cache.layers = [
        RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers
    ]
    return cache


def _mergeable(layer) -> bool:
    return type(layer) in (DynamicLayer, RoomyLayer)


@dataclass(eq=False)
class Row:
    """A live sequence: what it has generated so far and how it samples."""

    call: object  # the engine's record of the generate() call this row belongs to
    req: SeqRequest
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    limit: int  # completion length at which the row ends with "length"
    rng: random.Random | None
    temperature: float = 1.0
    top_p: float = 1.0  # 1 disables nucleus sampling


class KVBatch:
    """Rows, their cache, attention mask, next positions and next input tokens.

    The tensors are *physical*: a row that leaves stays in them, decoded and ignored,
    until such rows are ``DEAD_SHARE`` of the batch (or another batch merges in); only
    then are the tensors compacted. Dropping a row copies the whole cache, and under
    continuous batching a row finishes nearly every step. ``live`` maps ``rows[i]`` to
    its physical index (None: the identity).
    """

    DEAD_SHARE = 0.25

    def __init__(
        self,
        rows: list[Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        pos: torch.Tensor,
        temps: torch.Tensor,
        top_ps: torch.Tensor,
        *,
        logit_noise_std: float = 0.0,
    ):
        self.rows = rows
        self.cache = cache
        self.mask = mask  # (B, S) 1 where the cache column is a real token of the row
        self.pos = pos  # (B,) position id of each row's next input token
        self.temps = temps
        self.top_ps = top_ps
        self.next_ids = torch.zeros(len(rows), dtype=torch.long, device=mask.device)
        self.can_merge = all(_mergeable(layer) for layer in cache.layers)
        self.logit_noise_std = logit_noise_std
        self.live: torch.Tensor | None = None
        self.step = torch.ones_like(pos)  # 0 for left rows: their positions stay put

    @classmethod
    def prefill(
        cls,
        model,
        rows: list[Row],
        *,
        device: torch.device,
        version: int,
        logit_noise_std: float = 0.0,
    ) -> KVBatch:
        """Runs prompt + prefix of each new row through the model and samples its next token."""
        seqs = [row.req.prompt_token_ids + row.req.prefix_token_ids for row in rows]
        width = max(len(s) for s in seqs)
        pad = model.config.pad_token_id
        ids = torch.full((len(seqs), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        cache = roomy_cache(model.config)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        temps = torch.tensor([row.temperature for row in rows], dtype=torch.float32)
        top_ps = torch.tensor([row.top_p for row in rows], dtype=torch.float32)
        batch = cls(
            rows,
            cache,
            mask,
            mask.sum(dim=-1),
            temps.to(device),
            top_ps.to(device),
            logit_noise_std=logit_noise_std,
        )
        batch._take(out.logits[:, -1, :], version)
        return batch

    def decode(self, model, *, version: int) -> None:
        """Feeds every row its last sampled token and samples the next one."""
        ones = torch.ones((len(self.pos), 1), dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        out = model(
            input_ids=self.next_ids[:, None],
            attention_mask=mask,
            position_ids=self.pos[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.mask = mask
        self.pos = self.pos + self.step
        self._take(out.logits[:, -1, :], version)

    def _take(self, logits: torch.Tensor, version: int) -> None:
        live = self.live
        temps, top_ps = self.temps, self.top_ps
        if live is not None:
            logits, temps, top_ps = logits[live], temps[live], top_ps[live]
        if self.logit_noise_std > 0:
            logits = logits.float() + self.logit_noise_std * self._logit_noise(logits.shape[-1])
        uniforms = None
        if any(row.temperature > 0 for row in self.rows):
            draws = [row.rng.random() if row.temperature > 0 else 0.0 for row in self.rows]
            uniforms = torch.tensor(draws, dtype=torch.float32, device=logits.device)
        tokens, logprobs = sample_next(logits, temperatures=temps, top_ps=top_ps, uniforms=uniforms)
        # One device->host copy per step for both tokens and log-probs.
        host = torch.stack([tokens.double(), logprobs.double()]).cpu().tolist()
        for row, tok, lp in zip(self.rows, host[0], host[1], strict=True):
            row.tokens.append(int(tok))
            row.logprobs.append(lp)
            row.versions.append(version)
        if live is None:
            self.next_ids = tokens
        else:
            self.next_ids[live] = tokens

    def _logit_noise(self, vocab: int) -> torch.Tensor:
        """ε ~ N(0, 1) per row and vocabulary entry, from the row's own seeded stream.

        The engine then samples from, and records the log-prob of,
        log_softmax((logits + σ·ε) / T): an inference policy that differs from
        the trainer's by a known amount (``logit_noise_std``), the same for a
        sequence whatever batch it shares.
        """
        noise = torch.empty((len(self.rows), vocab), dtype=torch.float32)
        for i, row in enumerate(self.rows):
            gen = torch.Generator().manual_seed(row.rng.getrandbits(63))
            noise[i] = torch.randn(vocab, generator=gen)
        return noise.to(self.mask.device)

    def select(self, keep: list[int]) -> KVBatch | None:
        """Keeps only the rows at ``keep``; None when no row is left."""
        if not keep:
            return None
        if len(keep) == len(self.rows):
            return self
        device = self.mask.device
        kept = torch.tensor(keep, dtype=torch.long, device=device)
        self.live = kept if self.live is None else self.live[kept]
        self.rows = [self.rows[i] for i in keep]
        self.step = torch.zeros_like(self.step)
        self.step[self.live] = 1
        if len(self.pos) - len(self.rows) > self.DEAD_SHARE * len(self.pos):
            self._compact()
        return self

    def adopt(self, keep: list[int], rows: list[Row]) -> KVBatch | None:
        """Keeps the rows at ``keep``, handed to ``rows``: the same sequences resumed by
        another call, whose sampling settings (and draws) they take from now on."""
        batch = self.select(keep)
        if batch is None:
            return None
        batch.rows = list(rows)
        phys = batch.live if batch.live is not None else slice(None)
        device = batch.mask.device
        batch.temps[phys] = torch.tensor([r.temperature for r in rows], device=device)
        batch.top_ps[phys] = torch.tensor([r.top_p for r in rows], device=device)
        return batch

    def _compact(self) -> None:
        """Drops the left rows from the tensors and the padding columns no row uses."""
        if self.live is None:
            return
        idx, self.live = self.live, None
        self.cache.batch_select_indices(idx)
        self.mask, self.pos = self.mask[idx], self.pos[idx]
        self.temps, self.top_ps, self.next_ids = (
            self.temps[idx],
            self.top_ps[idx],
            self.next_ids[idx],
        )
        self.step = torch.ones_like(self.pos)
        if self.can_merge:
            # Columns left of every live row's first token are padding for all: cut them.
            first = int(self.mask.any(dim=0).to(torch.int8).argmax())
            if first > 0:
                for layer in self.cache.layers:
                    layer.keys = layer.keys[:, :, first:, :]
                    layer.values = layer.values[:, :, first:, :]
                self.mask = self.mask[:, first:]

    def merge(self, other: KVBatch) -> KVBatch:
        """Appends ``other``'s rows, left-padding the shorter cache to a common width."""
        if not (self.can_merge and other.can_merge):
            raise RuntimeError("this model's cache layers cannot take rows mid-batch")
        other._compact()
        if self._has_room_for(other):
            return self._append_rows(other)
        self._compact()
        width = max(self.mask.shape[1], other.mask.shape[1])
        grow_a, grow_b = width - self.mask.shape[1], width - other.mask.shape[1]
        for la, lb in zip(self.cache.layers, other.cache.layers, strict=True):
            if isinstance(la, RoomyLayer):
                la.absorb(lb, grow_a, grow_b)
                continue
            la.keys = torch.cat([_pad_seq(la.keys, grow_a), _pad_seq(lb.keys, grow_b)])
            la.values = torch.cat([_pad_seq(la.values, grow_a), _pad_seq(lb.values, grow_b)])
        self.mask = torch.cat([F.pad(self.mask, (grow_a, 0)), F.pad(other.mask, (grow_b, 0))])
        self.pos = torch.cat([self.pos, other.pos])
        self.temps = torch.cat([self.temps, other.temps])
        self.top_ps = torch.cat([self.top_ps, other.top_ps])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.step = torch.ones_like(self.pos)
        self.rows = self.rows + other.rows
        return self

    def _has_room_for(self, other: KVBatch) -> bool:
        """Whether ``other``'s rows fit in spare rows of our buffers, at our width."""
        layers = self.cache.layers
        return (
            other.mask.shape[1] <= self.mask.shape[1]
            and all(isinstance(layer, RoomyLayer) for layer in layers)
            and min(layer.spare_rows() for layer in layers) >= len(other.pos)
        )

    def _append_rows(self, other: KVBatch) -> KVBatch:
        """Merges ``other`` into spare rows: rows that left stay (lazily) where they are."""
        phys, add = len(self.pos), len(other.pos)
        grow = self.mask.shape[1] - other.mask.shape[1]
        for la, lb in zip(self.cache.layers, other.cache.layers, strict=True):
            la.append_rows(lb, grow)
        self.mask = torch.cat([self.mask, F.pad(other.mask, (grow, 0))])
        self.pos = torch.cat([self.pos, other.pos])
        self.temps = torch.cat([self.temps, other.temps])
        self.top_ps = torch.cat([self.top_ps, other.top_ps])
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        self.step = torch.cat([self.step, torch.ones_like(other.pos)])
        if self.live is not None:
            new = torch.arange(phys, phys + add, dtype=torch.long, device=self.live.device)
            self.live = torch.cat([self.live, new])
        self.rows = self.rows + other.rows
        return self


def _pad_seq(t: torch.Tensor, n: int) -> torch.Tensor:
    """Left-pads the sequence axis of a (B, H, S, D) cache tensor with n zero columns."""
    return F.pad(t, (0, 0, n, 0)) if n else t
