"""Job state in Redis, so that jobs survive a scheduler restart.

Keys (prefix ``rlfleet``):
- ``rlfleet:jobs``                hash  job id -> Job JSON
- ``rlfleet:jobs:seq``            counter giving each job its submission order
- ``rlfleet:jobs:order``          zset  job id -> seq (every job; list pagination)
- ``rlfleet:jobs:state:<state>``  zset  job id -> seq, one per state; the ``queued``
  one is the FIFO queue, the others make a state-filtered list cheap
- ``rlfleet:job:<id>:steps``      list  of StepRecord JSON, index = step
- ``rlfleet:idem:<key>``          string idempotency key -> job id (SET NX semantics)

Every change is an optimistic transaction (WATCH/MULTI) over the job hash, so a
cancel from the API and a progress update from the step loop never overwrite
each other, and a step record and the job's ``current_step`` move together.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import redis

from rlfleet.common.errors import AlreadyExists, InvalidArgument, NotFound
from rlfleet.scheduler.jobs import Job, JobState, StepRecord, check_transition

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


class JobStore:
    def __init__(self, client: redis.Redis, *, prefix: str = "rlfleet"):
        self.r = client
        self.prefix = prefix
        self._jobs = f"{prefix}:jobs"
        self._seq = f"{prefix}:jobs:seq"
        self._order = f"{prefix}:jobs:order"

    @classmethod
    def from_url(cls, url: str, **kwargs) -> JobStore:
        return cls(redis.Redis.from_url(url), **kwargs)

    def _state_key(self, state: JobState) -> str:
        return f"{self.prefix}:jobs:state:{state.value}"

    def _steps_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:steps"

    def _idem_key(self, key: str) -> str:
        return f"{self.prefix}:idem:{key}"

    # -- create / read -------------------------------------------------------

    def create(
        self, *, spec_json: str, total_steps: int, idempotency_key: str = ""
    ) -> tuple[Job, bool]:
        """Stores a new queued job; returns (job, created).

        With an idempotency key already used for the same spec, returns that job
        and ``created = False``; used for another spec, raises AlreadyExists.
        """
        now = time.time()
        job = Job(
            job_id=f"job-{uuid.uuid4().hex[:12]}",
            total_steps=total_steps,
            spec_json=spec_json,
            created_at=now,
            updated_at=now,
            seq=int(self.r.incr(self._seq)),  # gaps (from a lost race) are harmless
            idempotency_key=idempotency_key,
        )
        idem = self._idem_key(idempotency_key) if idempotency_key else None

        def tx(pipe: redis.client.Pipeline) -> str | None:
            if idem is not None:
                existing = pipe.get(idem)
                if existing is not None:
                    return existing.decode()
            pipe.multi()
            if idem is not None:
                pipe.set(idem, job.job_id)
            pipe.hset(self._jobs, job.job_id, job.model_dump_json())
            pipe.zadd(self._order, {job.job_id: job.seq})
            pipe.zadd(self._state_key(JobState.QUEUED), {job.job_id: job.seq})
            return None

        watches = [idem] if idem is not None else []
        existing_id = self.r.transaction(tx, *watches, value_from_callable=True)
        if existing_id is None:
            return job, True
        existing = self.get(existing_id)
        if existing.spec_json != spec_json:
            raise AlreadyExists(
                f"idempotency_key {idempotency_key!r} was already used for job {existing_id} "
                "with a different spec"
            )
        return existing, False

    def get(self, job_id: str) -> Job:
        raw = self.r.hget(self._jobs, job_id)
        if raw is None:
            raise NotFound(f"job {job_id!r} does not exist")
        return Job.model_validate_json(raw)

    def list(
        self, *, state: JobState | None = None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Job], str]:
        """Jobs newest first; returns (page, next_page_token or "")."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must not be negative (got {page_size})")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        upper: str = "+inf"
        if page_token:
            if not page_token.isdigit():
                raise InvalidArgument(
                    f"page_token {page_token!r} is not a token returned by a previous list call"
                )
            upper = f"({page_token}"  # exclusive: the page starts after the token's job
        index = self._state_key(state) if state is not None else self._order
        rows = self.r.zrevrangebyscore(index, upper, "-inf", start=0, num=size + 1, withscores=True)
        ids = [job_id for job_id, _ in rows[:size]]
        raws = self.r.hmget(self._jobs, ids) if ids else []
        jobs = [Job.model_validate_json(raw) for raw in raws if raw]
        next_token = str(int(rows[size - 1][1])) if len(rows) > size else ""
        return jobs, next_token

    def ids_in_state(self, state: JobState) -> list[str]:
        """Job ids in ``state``, oldest first."""
        return [b.decode() for b in self.r.zrange(self._state_key(state), 0, -1)]

    def next_queued(self) -> str | None:
        """The oldest queued job (FIFO), or None."""
        head = self.r.zrange(self._state_key(JobState.QUEUED), 0, 0)
        return head[0].decode() if head else None

    def count_by_state(self) -> dict[JobState, int]:
        pipe = self.r.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(self._state_key(state))
        return dict(zip(JobState, (int(n) for n in pipe.execute()), strict=True))

    def steps(
        self, job_id: str, *, since_step: int = 0, limit: int | None = None
    ) -> list[StepRecord]:
        """Step records from ``since_step`` on, at most ``limit`` of them (None: all)."""
        if since_step < 0:
            raise InvalidArgument(f"since_step must not be negative (got {since_step})")
        self.get(job_id)  # NotFound for an unknown job rather than an empty list
        last = -1 if limit is None else since_step + limit - 1
        raw = self.r.lrange(self._steps_key(job_id), since_step, last)
        return [StepRecord.model_validate_json(r) for r in raw]

    # -- changes -------------------------------------------------------------

    def _mutate(
        self,
        job_id: str,
        change: Callable[[Job], Job | None],
        *,
        extra: Callable[[redis.client.Pipeline, Job, Job], None] | None = None,
    ) -> Job:
        """Applies ``change`` to the stored job atomically (retried on a concurrent write).

        ``change`` returns the new job, or None for "leave it as it is".
        ``extra`` queues more commands in the same MULTI.
        """

        def tx(pipe: redis.client.Pipeline) -> Job:
            raw = pipe.hget(self._jobs, job_id)
            if raw is None:
                raise NotFound(f"job {job_id!r} does not exist")
            old = Job.model_validate_json(raw)
            new = change(old.model_copy(deep=True))
            if new is None:
                return old
            new.updated_at = time.time()
            pipe.multi()
            pipe.hset(self._jobs, job_id, new.model_dump_json())
            if new.state != old.state:
                pipe.zrem(self._state_key(old.state), job_id)
                pipe.zadd(self._state_key(new.state), {job_id: new.seq})
            if extra is not None:
                extra(pipe, old, new)
            return new

        return self.r.transaction(tx, self._jobs, value_from_callable=True)

    def transition(self, job_id: str, state: JobState, *, reason: str = "") -> Job:
        """Moves the job to ``state``; FailedPrecondition if the move is illegal."""

        def change(job: Job) -> Job:
            check_transition(job_id, job.state, state)
            job.state = state
            if reason:
                job.reason = reason
            return job

        return self._mutate(job_id, change)

    def set_version(self, job_id: str, policy_version: int) -> Job:
        def change(job: Job) -> Job:
            job.policy_version = policy_version
            return job

        return self._mutate(job_id, change)

    def record_step(
        self, job_id: str, step: int, metrics: dict[str, float], *, policy_version: int
    ) -> Job:
        """Appends the step record and advances ``current_step`` in one transaction.

        A step that is already recorded (a resumed job redoing it) is ignored; a
        step beyond the next one is refused, so the list index always equals the step.
        """
        record = StepRecord(step=step, metrics=metrics, finished_at=time.time())

        def change(job: Job) -> Job | None:
            if step < job.current_step:
                return None
            if step > job.current_step:
                raise InvalidArgument(
                    f"step {step} of job {job_id} cannot be recorded before step {job.current_step}"
                )
            job.current_step = step + 1
            job.policy_version = policy_version
            job.summary = dict(metrics)
            return job

        def append(pipe: redis.client.Pipeline, old: Job, new: Job) -> None:
            pipe.rpush(self._steps_key(job_id), record.model_dump_json())

        return self._mutate(job_id, change, extra=append)
