"""C3PO++ pool state in Redis, so a restarted scheduler resumes a job's rollouts.

Keys (prefix ``rlfleet``), per job:
- ``rlfleet:c3po:<job>:meta``    hash: ``step`` (the last step whose rollout phase
  is saved), ``next_serial`` (the job's prompt counter), ``released`` (JSON list
  of the serials that step released to training)
- ``rlfleet:c3po:<job>:groups``  hash: serial -> one encoded group (members'
  tokens, log-probs, version spans, retention; a multi-turn episode's state)

The state is written once per iteration, at the end of its rollout phase, in one
MULTI/EXEC: only groups that changed are rewritten and dropped ones deleted. The
released groups (Q) stay stored until the next iteration, so a scheduler that
dies after the rollout phase but before the step is recorded trains the very
same groups when it redoes the step; one that dies during the rollout phase
redoes it from the state saved by the previous iteration.

Encoding of a group: 4-byte header length, a JSON header (everything but the
per-token arrays; versions run-length encoded), then per member its token ids
(int32) and inference log-probs (float32, as the engines report them).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from array import array
from dataclasses import dataclass, field

import redis

from rlfleet.scheduler.c3po.pool import EpisodeState, Group, InferencePool, Rollout


@dataclass
class SavedState:
    pool: InferencePool
    step: int
    """The step whose rollout phase this state ends (-1: nothing saved yet)."""
    released: list[Group] = field(default_factory=list)
    """The groups that step released to training, in release order."""


def encode_group(group: Group) -> bytes:
    members = []
    body = bytearray()
    for m in group.members:
        members.append(
            {
                "seq_id": m.seq_id,
                "member": m.member,
                "length": m.length,
                "spans": m.spans,
                "retention": m.retention,
                "finished": m.finished,
                "finish_reason": m.finish_reason,
                "n_tok": len(m.token_ids),
                "episode": dataclasses.asdict(m.episode) if m.episode else None,
            }
        )
        body += array("i", m.token_ids).tobytes()
        body += array("f", m.logprobs).tobytes()
    header = json.dumps(
        {
            "serial": group.serial,
            "prompt_len": group.prompt_len,
            "entered_step": group.entered_step,
            "prompt_ids": group.prompt_ids,
            "task_json": group.task_json,
            "members": members,
        },
        separators=(",", ":"),
    ).encode()
    return struct.pack("<I", len(header)) + header + bytes(body)


def decode_group(raw: bytes) -> Group:
    (n,) = struct.unpack_from("<I", raw)
    header = json.loads(raw[4 : 4 + n])
    offset = 4 + n
    members = []
    for h in header["members"]:
        k = h["n_tok"]
        tokens = array("i")
        tokens.frombytes(raw[offset : offset + 4 * k])
        offset += 4 * k
        logprobs = array("f")
        logprobs.frombytes(raw[offset : offset + 4 * k])
        offset += 4 * k
        members.append(
            Rollout(
                seq_id=h["seq_id"],
                member=h["member"],
                length=h["length"],
                spans=[list(s) for s in h["spans"]],
                token_ids=tokens.tolist(),
                logprobs=logprobs.tolist(),
                retention=h["retention"],
                finished=h["finished"],
                finish_reason=h["finish_reason"],
                episode=EpisodeState(**h["episode"]) if h.get("episode") else None,
                dirty=False,
            )
        )
    return Group(
        serial=header["serial"],
        prompt_len=header["prompt_len"],
        members=members,
        entered_step=header["entered_step"],
        prompt_ids=list(header["prompt_ids"]),
        task_json=header["task_json"],
        dirty=False,
    )


class C3poStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "rlfleet"):
        self.r = client
        self.prefix = prefix

    def _meta(self, job_id: str) -> str:
        return f"{self.prefix}:c3po:{job_id}:meta"

    def _groups(self, job_id: str) -> str:
        return f"{self.prefix}:c3po:{job_id}:groups"

    def load(self, job_id: str) -> SavedState:
        """The saved state of ``job_id``; an empty pool at step -1 when there is none."""
        meta = {k.decode(): v.decode() for k, v in self.r.hgetall(self._meta(job_id)).items()}
        if not meta:
            return SavedState(InferencePool(), step=-1)
        released_serials = json.loads(meta.get("released", "[]"))
        raw = self.r.hgetall(self._groups(job_id))
        groups = {int(k): decode_group(v) for k, v in raw.items()}
        pool = InferencePool(next_serial=int(meta["next_serial"]))
        released = []
        for serial in released_serials:
            if serial in groups:
                released.append(groups.pop(serial))
        for serial in sorted(groups):
            pool.add(groups[serial])
        pool.mark_saved()
        return SavedState(pool, step=int(meta["step"]), released=released)

    def save(self, job_id: str, pool: InferencePool, *, step: int, released: list[Group]) -> int:
        """Writes the state at the end of ``step``'s rollout phase; returns the bytes written."""
        meta_key, groups_key = self._meta(job_id), self._groups(job_id)
        old_released = json.loads(self.r.hget(meta_key, "released") or b"[]")
        keep = {g.serial for g in released} | set(pool.groups)
        drop = sorted((set(pool.removed) | set(old_released)) - keep)
        changed = {
            str(g.serial): encode_group(g)
            for g in [*pool.groups.values(), *released]
            if g.dirty or any(m.dirty for m in g.members)
        }
        pipe = self.r.pipeline(transaction=True)
        if drop:
            pipe.hdel(groups_key, *[str(s) for s in drop])
        if changed:
            pipe.hset(groups_key, mapping=changed)
        pipe.hset(
            meta_key,
            mapping={
                "step": step,
                "next_serial": pool.next_serial,
                "released": json.dumps([g.serial for g in released]),
            },
        )
        pipe.execute()
        pool.mark_saved()
        for g in released:
            g.dirty = False
            for m in g.members:
                m.dirty = False
        return sum(len(v) for v in changed.values())

    def delete(self, job_id: str) -> None:
        self.r.delete(self._meta(job_id), self._groups(job_id))
