"""The scheduler's transport-agnostic core: job API and the worker that runs jobs.

The gRPC servicer (and, later, the REST router) are thin adapters over
``SchedulerCore``. Jobs run one at a time in submission order. All job state is
in Redis: after a restart the worker first resumes a job it finds ``running``
(from its recorded step), then takes queued jobs.
"""

from __future__ import annotations

import logging
import threading

import redis
from pydantic import ValidationError

from rlfleet.common.errors import FailedPrecondition, InvalidArgument, NotFound, RlfleetError
from rlfleet.common.jobspec import JobSpec, check_sequence_classifier
from rlfleet.scheduler import metrics
from rlfleet.scheduler.jobs import Interrupted, Job, JobState, StepRecord, parse_state
from rlfleet.scheduler.loop import JobRunner
from rlfleet.scheduler.samples import load_codec
from rlfleet.scheduler.store import JobStore
from rlfleet.scheduler.strategy import check_mode

logger = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY = 256


def describe_spec_error(exc: ValidationError) -> str:
    """One sentence naming each bad field of a JobSpec."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "invalid job spec: " + "; ".join(parts)


def validate_spec(spec_json: str, *, store: JobStore | None = None) -> JobSpec:
    """The parsed spec, or InvalidArgument naming what is wrong with it.

    ``model.from_job`` is resolved against ``store`` into ``model.path`` (the named
    job's final checkpoint); without a store it cannot be, and is refused."""
    if not spec_json.strip():
        raise InvalidArgument("spec_json is empty; send a JobSpec as JSON")
    try:
        spec = JobSpec.model_validate_json(spec_json)
    except ValidationError as exc:
        raise InvalidArgument(describe_spec_error(exc)) from None
    if spec.model.from_job:
        spec.model.path = _final_checkpoint(spec, store)
    try:
        spec.model.check_exists()
        check_mode(spec.scheduling.mode)
        _check_reward_models(spec)
    except ValueError as exc:
        raise InvalidArgument(f"invalid job spec: {exc}") from None
    codec = load_codec(spec.model.path)  # InvalidArgument without a tokenizer.json
    prompt = _check_task(spec)
    codec.prompt_ids(prompt, spec.task)  # chat: InvalidArgument without a chat template
    return spec


def _check_reward_models(spec: JobSpec) -> None:
    """Every reward-model directory the job names holds a sequence classifier (reads
    config.json only: the scheduler never loads the model)."""
    reward = spec.reward
    if reward.verifier == "reward_model":
        check_sequence_classifier(str(reward.reward_model.get("path", "")))
    for i, term in enumerate(reward.terms):
        if term.verifier == "reward_model":
            field = f"reward.terms[{i}].settings.path"
            check_sequence_classifier(str(term.settings.get("path", "")), field=field)


def _final_checkpoint(spec: JobSpec, store: JobStore | None) -> str:
    """The directory of the final checkpoint of ``model.from_job``."""
    source = spec.model.from_job
    if spec.model.path:
        raise InvalidArgument("invalid job spec: model: set model.path or model.from_job, not both")
    if store is None:
        raise InvalidArgument("invalid job spec: model.from_job needs the scheduler's job store")
    try:
        job = store.get(source)
    except NotFound:
        raise InvalidArgument(
            f"invalid job spec: model.from_job {source!r} is not a known job"
        ) from None
    if job.state != JobState.SUCCEEDED:
        raise InvalidArgument(
            f"invalid job spec: model.from_job {source!r} is {job.state.value}; a job starts "
            "from another's final checkpoint once that job has succeeded"
        )
    from rlfleet.trainer.state import TrainerStore

    result = TrainerStore(store.r).get_result(source, job.total_steps - 1)
    if result is None or not result.checkpoint_path:
        raise InvalidArgument(
            f"invalid job spec: model.from_job {source!r} has no final checkpoint recorded"
        )
    return result.checkpoint_path


def _check_task(spec: JobSpec) -> str:
    """Builds the task's dataset once, so bad ``task.params`` (or a dataset file that
    cannot be read, or lacks a mapped column) fail the submit, not the job; returns the
    first prompt."""
    from rlfleet.common.tasks import PromptSource

    try:
        prompt, _ = PromptSource(spec.task).get(0)
        data = spec.task.dataset
        if data is not None and (data.eval_split or data.eval_fraction):
            from rlfleet.common.dataset_task import DatasetEntries

            DatasetEntries(data, seed=spec.task.seed, part="eval")[0]
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        reason = str(exc).replace("__init__() ", "") or type(exc).__name__
        if spec.task.kind == "dataset":
            raise InvalidArgument(f"invalid job spec: {reason}") from None
        raise InvalidArgument(
            f"invalid job spec: task.params do not fit task {spec.task.name!r}: {reason}"
        ) from None
    return prompt


class SchedulerCore:
    def __init__(self, *, store: JobStore, runner: JobRunner, poll_interval_s: float = 1.0):
        self.store = store
        self.runner = runner
        self.poll_interval_s = poll_interval_s
        self._lock = threading.Lock()
        self._current: tuple[str, threading.Event] | None = None
        self._wake = threading.Event()
        self._shutdown = threading.Event()
        self._thread: threading.Thread | None = None

    # -- job API ------------------------------------------------------------

    def submit(self, spec_json: str, *, idempotency_key: str = "") -> Job:
        if len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidArgument(
                f"idempotency_key is {len(idempotency_key)} characters long; "
                f"at most {MAX_IDEMPOTENCY_KEY} are allowed"
            )
        spec = validate_spec(spec_json, store=self.store)
        if spec.task.environment is not None and self.runner.clients.env is None:
            raise InvalidArgument(
                "task.environment needs the environment service, and this scheduler has no "
                "--env-address (rlfleet up starts one)"
            )
        job, created = self.store.create(
            spec_json=spec.model_dump_json(),
            total_steps=spec.steps,
            idempotency_key=idempotency_key,
        )
        if created:
            logger.info("job %s queued", job.job_id, extra={"job_id": job.job_id})
            self._refresh_gauges()
            self._wake.set()
        return job

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(
        self, *, state: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Job], str]:
        wanted = parse_state(state) if state else None
        return self.store.list(state=wanted, page_size=page_size, page_token=page_token)

    def cancel(self, job_id: str) -> Job:
        job = self.store.transition(job_id, JobState.CANCELLED, reason="cancelled by request")
        with self._lock:
            if self._current is not None and self._current[0] == job_id:
                self._current[1].set()  # aborts generation in flight
        logger.info("job %s cancelled", job_id, extra={"job_id": job_id})
        self._refresh_gauges()
        return job

    def steps(
        self, job_id: str, *, since_step: int = 0, limit: int | None = None
    ) -> list[StepRecord]:
        return self.store.steps(job_id, since_step=since_step, limit=limit)

    # -- worker ---------------------------------------------------------------

    def start(self) -> None:
        """Starts the worker thread (resumes a running job first)."""
        self._shutdown.clear()
        self._thread = threading.Thread(target=self._work, name="scheduler-worker", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the worker thread runs (the REST API's /readyz reports it)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Stops the worker; a job in progress stays ``running`` and resumes on the next start."""
        self._shutdown.set()
        with self._lock:
            if self._current is not None:
                self._current[1].set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _work(self) -> None:
        while not self._shutdown.is_set():
            try:
                ran = self.run_once()
            except Exception:  # noqa: BLE001 - e.g. Redis down: log and try again
                logger.exception("scheduler worker error; retrying")
                ran = False
            if not ran:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()

    def run_once(self) -> bool:
        """Runs the next job to its end (or until stopped); False if there was none."""
        running = self.store.ids_in_state(JobState.RUNNING)
        if running:
            job_id = running[0]
            logger.info("resuming job %s", job_id, extra={"job_id": job_id})
        else:
            job_id = self.store.next_queued()
            if job_id is None:
                return False
            try:
                self.store.transition(job_id, JobState.RUNNING)
            except FailedPrecondition:
                return True  # cancelled between being listed and picked up
            logger.info("job %s started", job_id, extra={"job_id": job_id})
        self._refresh_gauges()
        try:
            self._execute(job_id)
        finally:
            self._refresh_gauges()
        return True

    def _execute(self, job_id: str) -> None:
        stop = threading.Event()
        with self._lock:
            self._current = (job_id, stop)
        if self._shutdown.is_set():
            stop.set()
        try:
            self.runner.run(job_id, stop)
            logger.info("job %s succeeded", job_id, extra={"job_id": job_id})
        except Interrupted as exc:
            logger.info("job %s stopped: %s", job_id, exc, extra={"job_id": job_id})
        except RlfleetError as exc:
            self._fail(job_id, exc.message)
        except ValidationError as exc:  # a stored spec that no longer validates
            self._fail(job_id, describe_spec_error(exc))
        except redis.RedisError:
            # Not the job's fault: it stays running and is resumed once Redis answers.
            raise
        except Exception as exc:  # noqa: BLE001 - the reason must not carry a traceback
            logger.exception("job %s hit an internal error", job_id)
            self._fail(job_id, f"internal scheduler error ({type(exc).__name__}); see its log")
        finally:
            with self._lock:
                self._current = None

    def _fail(self, job_id: str, reason: str) -> None:
        logger.error("job %s failed: %s", job_id, reason, extra={"job_id": job_id})
        try:
            self.store.transition(job_id, JobState.FAILED, reason=reason)
        except FailedPrecondition:
            pass  # cancelled meanwhile: that state stands

    def _refresh_gauges(self) -> None:
        try:
            for state, n in self.store.count_by_state().items():
                metrics.JOBS.labels(state.value).set(n)
        except redis.RedisError:
            logger.warning("could not read job counts from Redis")
