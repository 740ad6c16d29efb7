"""C3PO++ across turns: multi-turn episodes (``task.environment``) in the pool P.

Each member of a group is one episode. Its rollout is the trajectory so far: the
model's turns and the environment's replies in order, the replies' tokens carrying
``ENV_VERSION``. The driver runs it like any rollout, with two differences:

- A replica's "finished" is the end of a model *turn*. ``EpisodeBackend`` sends the turn
  to the env service (Step, on a worker thread, while the replicas go on) and hands the
  driver either the member finished (the episode ended; the environment's reward is
  its reward) or ``Continued`` (the reply's tokens appended; the driver dispatches it
  again, capped at one more turn).
- The budget C counts the model's tokens only (``Group.tokens``); so does Ω's purpose,
  the sequences in flight: an episode between turns is unfinished and occupies a slot.

The stop finds each episode somewhere: mid-turn (the replica's partial is kept and the
turn resumes under the next version, with the rest of its own token cap), or between
turns (the reply is already appended; the next turn starts under the next version).
Steps in progress at the stop are waited for, so P never holds a turn the environment
has not answered, and the saved pool is one the env service agrees with.

The env service keeps episodes in memory. When it answers NOT_FOUND (restarted,
expired) or FAILED_PRECONDITION (it holds a later turn than P: the scheduler restarted
from the pool saved at the end of the previous step), that member's episode starts
again from its prompt under a fresh id, its tokens dropped (``RESTARTS`` times at most,
then the job fails with the env service's sentence). Samples are written only when a
group is released, once each, so an episode cut short is never trained and none twice.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rlfleet.common.errors import FailedPrecondition, NotFound, RlfleetError
from rlfleet.common.tasks import entry_to_json
from rlfleet.scheduler.c3po.driver import Continued, Event, RolloutBackend, WorkUnit
from rlfleet.scheduler.c3po.grpc_backend import GrpcBackend
from rlfleet.scheduler.c3po.pool import (
    ENV_VERSION,
    EpisodeState,
    Group,
    Progress,
    Rollout,
    extend_spans,
)
from rlfleet.scheduler.episodes import RESTARTS, EnvTurns, TurnOutcome
from rlfleet.scheduler.samples import sample_id

logger = logging.getLogger(__name__)


def new_episode_id(job_id: str, seq_id: str) -> str:
    return f"{job_id}/{seq_id}/{uuid.uuid4().hex[:8]}"


class EpisodeGroupSource:
    """New groups whose members are fresh episodes of one prompt row."""

    def __init__(self, turns: EnvTurns, *, group_size: int):
        self.turns = turns
        self.group_size = group_size

    def draw(self, serial: int, *, step: int) -> Group:
        ctx = self.turns.ctx
        task_json = entry_to_json(ctx.prompts.get(serial)[1])
        members, prompt = [], None
        for m in range(self.group_size):
            sid = sample_id(serial, m)
            episode_id = new_episode_id(ctx.job_id, sid)
            ids = self.turns.reset(episode_id, task_json, sid)
            if prompt is not None and ids != prompt:
                raise FailedPrecondition(
                    f"environment {self.turns.env.name!r} opened the episodes of prompt "
                    f"{serial} differently; a GRPO group's members must share their prompt"
                )
            prompt = ids
            members.append(Rollout(seq_id=sid, member=m, episode=EpisodeState(episode_id)))
        return Group(serial=serial, prompt_len=len(prompt or []), members=members,
                     entered_step=step, prompt_ids=prompt or [], task_json=task_json)  # fmt: skip


@dataclass
class _Answered:
    """The env service answered a turn (on a worker thread): the driver's event and the
    member's new episode state, or the error that ends the job."""

    seq_id: str
    event: Event | None = None
    episode: EpisodeState | None = None
    error: BaseException | None = None


class EpisodeBackend(RolloutBackend):
    """Wraps the replicas' backend: turn ends go to the env service, the driver sees
    episodes finish or continue. Built per iteration; ``close`` when it is over."""

    def __init__(self, inner: GrpcBackend, turns: EnvTurns, *, workers: int = 16):
        self.inner = inner
        self.turns = turns
        self._members: dict[str, tuple[Group, Rollout]] = {}
        self._stepping = 0  # turns sent to the env service and not yet handed to the driver
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="env-step")
        self.restarted = 0
        """Episodes started again because the env service had lost them."""

    # -- RolloutBackend -----------------------------------------------------------------

    def now(self) -> float:
        return self.inner.now()

    @property
    def in_flight(self) -> int:
        return self.inner.in_flight + self._stepping

    def idle_seconds(self) -> dict[str, float]:
        return self.inner.idle_seconds()

    def submit(self, units: list[WorkUnit]) -> None:
        for group, members in units:
            for m in members:
                self._members[m.seq_id] = (group, m)
                start = m.episode.turn_start if m.episode else 0
                m.max_tokens = self.turns.turn_limit(start, group.prompt_len)
        self.inner.submit(units)

    def wait(self, timeout: float) -> list[Event]:
        return self._route(self.inner.wait(timeout))

    def abort(self) -> list[Event]:
        events = self._route(self.inner.abort())
        while self._stepping:  # the turns that ended are answered before P is saved
            events += self._route(self.inner.wait(1.0))
        return events

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    # -- internals ----------------------------------------------------------------------

    def _route(self, events: list) -> list[Event]:
        out: list[Event] = []
        error: BaseException | None = None
        for event in events:
            if isinstance(event, _Answered):
                self._stepping -= 1
                if event.error is not None:
                    error = error or event.error
                    continue
                member = self._members[event.seq_id][1]
                self.restarted += event.episode.restarts > member.episode.restarts
                member.episode = event.episode
                out.append(event.event)
            elif isinstance(event, Progress) and event.finished and event.seq_id in self._members:
                self._stepping += 1
                self._executor.submit(self._answer, *self._members[event.seq_id], event)
            else:
                out.append(event)
        if error is not None:
            self.inner.abort()  # stop the replicas before the job fails
            self._executor.shutdown(wait=True)
            raise error
        return out

    def _answer(self, group: Group, member: Rollout, progress: Progress) -> None:
        """Worker thread: the env service's answer to the turn that ``progress`` ended."""
        ep = member.episode
        assert ep is not None
        tokens = list(progress.token_ids or [])
        try:
            try:
                outcome = self.turns.after_turn(
                    ep.episode_id, ep.turns, tokens[ep.turn_start :], length=len(tokens),
                    prompt_len=group.prompt_len, what=member.seq_id)  # fmt: skip
            except (NotFound, FailedPrecondition) as exc:
                answered = self._restart(group, member, ep, exc)
            else:
                answered = self._next(member, ep, progress, outcome)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver's thread
            answered = _Answered(member.seq_id, error=exc)
        self.inner.post(answered)

    @staticmethod
    def _next(member: Rollout, ep: EpisodeState, progress: Progress,
              outcome: TurnOutcome) -> _Answered:  # fmt: skip
        state = dataclasses.replace(ep, turns=ep.turns + 1, reward=outcome.reward,
                                    tool_calls=ep.tool_calls + outcome.tool_calls)  # fmt: skip
        if outcome.done:
            return _Answered(
                member.seq_id, dataclasses.replace(progress, finish_reason=outcome.finish), state
            )
        n = len(outcome.env_ids)
        tokens = [*(progress.token_ids or []), *outcome.env_ids]
        state.turn_start = len(tokens)
        return _Answered(member.seq_id, Continued(Progress(
            seq_id=member.seq_id, length=len(tokens),
            spans=extend_spans(progress.spans, ENV_VERSION, n), finished=False, finish_reason="",
            token_ids=tokens, logprobs=[*(progress.logprobs or []), *[0.0] * n],
        )), state)  # fmt: skip

    def _restart(self, group: Group, member: Rollout, ep: EpisodeState,
                 exc: RlfleetError) -> _Answered:  # fmt: skip
        """The env service no longer holds the episode as P does: start it again."""
        if ep.restarts >= RESTARTS:
            raise type(exc)(
                f"episode {member.seq_id}: the env service lost it {ep.restarts + 1} times; "
                f"giving up: {exc.message}"
            )
        episode_id = new_episode_id(self.turns.ctx.job_id, member.seq_id)
        prompt = self.turns.reset(episode_id, group.task_json, member.seq_id)
        if prompt != group.prompt_ids:
            raise FailedPrecondition(
                f"episode {member.seq_id}: environment {self.turns.env.name!r} opened it "
                "differently when it was started again; its group's prompt no longer holds"
            )
        logger.warning("episode %s: %s; started again from its prompt as %s", member.seq_id,
                       exc.message, episode_id)  # fmt: skip
        state = EpisodeState(episode_id, restarts=ep.restarts + 1)
        return _Answered(member.seq_id, Continued(Progress(
            seq_id=member.seq_id, length=0, spans=[], finished=False, finish_reason="",
            token_ids=[], logprobs=[])), state)  # fmt: skip
