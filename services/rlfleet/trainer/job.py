"""One job's policy, optimizer and training step.

A step, in the order that keeps experience safe across crashes:

1. take the step's samples from the buffer (own pending entries first, then
   entries a dead consumer left pending, then new ones);
2-3. the update: GRPO (``grpo.py``: advantages, log-probs at θ_old, the PPO/IcePop
   loss over mini-batches and token-bounded micro-batches, AdamW) or SFT (``sft.py``);
4. gather the new weights into one payload, a bucket at a time (``publish.py``);
   when a checkpoint is due, every rank starts writing its optimizer shards (DCP)
   and a background thread writes the payload and the rest of the checkpoint
   (``checkpoint.py``), off the step's critical path; the job's last step waits for it;
5. mark the result "settling" in Redis, then publish version step + 1 to weight-sync;
6. store the step result (idempotency) and drop the mark, then acknowledge the entries.

If the process dies before 6 the entries stay pending for the next trainer: when
weight-sync already holds the version (it died between 5 and 6), its successor takes
that version back and settles the step (a retrain would make another payload under the
same version number, which weight-sync refuses); otherwise step 1 picks them up again.
If it dies between storing and acknowledging, a repeated TrainStep re-acknowledges them.

With a weight group that reaches every replica (``background``: the scheduler says
so), the step returns once the version is broadcast, and 5-6 run on a thread of
their own while the next step's rollout runs: weight-sync is off the step's path.
The result is marked "settling" in Redis first; the next TrainStep (or a repeated
one, or InitJob) waits for 5-6 before anything else, so entries are acknowledged
only once weight-sync holds their version. A trainer that dies in between leaves
the mark and the entries pending: its successor retrains that step from exactly
those entries and publishes the version, or takes it back from weight-sync when the push
had ended (``_retrain_unsettled``). The replicas
sampled the next step with the broadcast of the first training; the trainer's
log-probs come from the retrained one, and IcePop corrects the difference, as for
any train/inference mismatch. A step due for a checkpoint publishes in the
foreground (the checkpoint writer takes the payload).

Fault tests only: ``RLFLEET_PUBLISH_PAUSE_S`` (seconds, default 0), read once when this
module is imported, makes a push running in the background sleep that long before it
starts, after logging "version N: background publish paused X.XXs (...)", so a test can
kill the trainer while the replicas hold a version that weight-sync does not
(tests/chaos). Leave it unset in service: it delays every background push by that much.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from rlfleet.common.buffer import Entry, ExperienceBuffer
from rlfleet.common.errors import FailedPrecondition, InvalidArgument
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.procs import free_port
from rlfleet.common.weight_group import BACKENDS, GroupAddress, WeightSender
from rlfleet.common.weight_transport import BufferPool
from rlfleet.common.weights import Buffer, checksum_of
from rlfleet.trainer import metrics as prom
from rlfleet.trainer.batching import to_train_sample
from rlfleet.trainer.checkpoint import OPTIMIZER_DIR, CheckpointInfo, CheckpointStore
from rlfleet.trainer.engine import PolicyEngine, RankMirror, pick_device
from rlfleet.trainer.publish import (
    GATHER_BUCKET_BYTES,
    PayloadStream,
    WeightPublisher,
    gather_payload,
)
from rlfleet.trainer.state import StepResult, TrainerStore

logger = logging.getLogger(__name__)

PUBLISH_PAUSE_ENV = "RLFLEET_PUBLISH_PAUSE_S"
"""Fault-injection knob (tests only): seconds a background push waits before it starts."""
_PUBLISH_PAUSE_S = float(os.environ.get(PUBLISH_PAUSE_ENV) or 0.0)


class JobTrainer:
    """Policy, optimizer and step loop of one job; thread-safe (one step at a time)."""

    def __init__(
        self,
        *,
        job_id: str,
        spec: JobSpec,
        buffer: ExperienceBuffer,
        store: TrainerStore,
        publisher: WeightPublisher,
        checkpoint_dir: str | Path,
        consumer: str = "trainer-0",
        read_timeout_s: float = 60.0,
        reclaim_idle_s: float = 60.0,
        device: torch.device | None = None,
        mirror: RankMirror | None = None,
        gather_bucket_bytes: int = GATHER_BUCKET_BYTES,
        weight_group_host: str = "127.0.0.1",
    ):
        self.job_id = job_id
        self.spec = spec
        self.buffer = buffer
        self.store = store
        self.publisher = publisher
        self.checkpoints = CheckpointStore(checkpoint_dir, job_id, keep=spec.checkpoint.keep)
        self.consumer = consumer
        self.read_timeout_s = read_timeout_s
        self.reclaim_idle_s = reclaim_idle_s
        self.device = device or pick_device()
        # The policy lives in an engine on every trainer rank; this rank (0) drives them.
        self.mirror = mirror or RankMirror(device=self.device)
        self.engine: PolicyEngine | None = None
        self.version = 0
        self.last_step = -1
        self._unpublished: StepResult | None = None
        self._settling: tuple[StepResult, Buffer, Future] | None = None
        """A step published in the background: its result, payload and the push."""
        self._publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pub-{job_id}")
        self._lock = threading.Lock()
        self.gather_bucket_bytes = gather_bucket_bytes
        # Payloads of past versions, reused (a version is the same size every step); a
        # checkpoint being written holds its payload until it is done.
        self._payloads = BufferPool(keep=2)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ckpt-{job_id}")
        self._writing: Future | None = None
        self.weight_group_host = weight_group_host
        self._sender: WeightSender | None = None  # the job's weight group, when open

    # ------------------------------------------------------------------ init
    def init_job(self) -> tuple[int, bool]:
        """Loads the base model or resumes; publishes that version; returns (version, resumed).

        Resuming takes the newest checkpoint (weights + AdamW state), then the
        weights of any later step whose result is stored, from weight-sync.
        """
        with self._lock:
            torch.manual_seed(self.spec.seed)
            self.checkpoints.remove_partial()
            latest = self.checkpoints.latest()
            source = latest.path if latest else Path(self.spec.model.path)
            if self.spec.model.master_dtype != "float32":
                logger.warning(
                    "model.master_dtype is %s: AdamW updates weights in low precision, and "
                    "updates below half an ulp round away (float32 masters avoid this)",
                    self.spec.model.master_dtype,
                    extra={"job_id": self.job_id},
                )
            self.mirror.create(self.job_id, self.spec)
            try:
                self.mirror.call(self.job_id, "load", str(source))
            except ValueError as exc:  # e.g. activation checkpointing on a model without layers
                raise InvalidArgument(str(exc)) from None
            self.engine = self.mirror.engines[self.job_id]
            if latest is not None:
                self._load_optimizer(latest)
                self.version, self.last_step = latest.version, latest.step
            restored = self._catch_up_from_weightsync()
            if not restored:  # weight-sync already holds what it handed us
                self._publish_resumed(source)
            if latest is not None:
                self._settle_checkpointed_step(latest.state.get("result"))
            self._retrain_unsettled()
            resumed = self.version > 0
            prom.POLICY_VERSION.labels(self.job_id).set(self.version)
            logger.info(
                "job initialised",
                extra={
                    "job_id": self.job_id,
                    "version": self.version,
                    "resumed": resumed,
                    "source": str(source),
                },
            )
            return self.version, resumed

    def _load_optimizer(self, latest: CheckpointInfo) -> None:
        sharded = latest.path / OPTIMIZER_DIR
        if sharded.is_dir():
            self.mirror.call(self.job_id, "load_optimizer", str(sharded))
            return
        whole = self.checkpoints.legacy_optimizer_state(latest)
        if whole is not None:
            self.mirror.call(self.job_id, "load_optimizer_state", main_only=(whole,))

    def _catch_up_from_weightsync(self) -> bool:
        """Steps stored past the newest checkpoint (or with none): take their weights back.

        Their results are in Redis and their weights were published, so the
        job continues at the last published version instead of failing; the
        AdamW moments are those of the checkpoint (or fresh), which is logged.
        """
        last = self.last_step
        while self.store.get_result(self.job_id, last + 1) is not None:
            last += 1
        if last == self.last_step:
            return False
        target = last + 1
        if not self._load_held(target):
            raise FailedPrecondition(
                f"job {self.job_id} trained up to version {target}, but its newest checkpoint "
                f"holds version {self.version} and weight-sync no longer has version {target}; "
                "the job cannot resume (set checkpoint.every_steps to checkpoint more often)"
            )
        logger.warning(
            "resumed from weights held by weight-sync; optimizer moments are older",
            extra={"job_id": self.job_id, "version": target, "checkpoint_version": self.version},
        )
        self.version, self.last_step = target, last
        return True

    def _load_held(self, version: int) -> bool:
        """Loads ``version`` from weight-sync into the model; False when it is not held."""
        state = self.publisher.fetch(job_id=self.job_id, version=version)
        if state is None:
            return False
        self.mirror.call(self.job_id, "load_weights", main_only=(state,))
        return True

    def _publish_resumed(self, source: Path) -> None:
        try:
            self._publish(self.version)
        except FailedPrecondition as exc:
            raise FailedPrecondition(
                f"job {self.job_id} resumed at version {self.version} from {source}, but "
                f"weight-sync refused it: {exc.message}"
            ) from None

    def _settle_checkpointed_step(self, saved: dict | None) -> None:
        """The checkpoint's own step may have died before its result was stored: store it now."""
        if not saved:
            return
        result = StepResult.from_dict(saved)
        if self.store.get_result(self.job_id, result.step) is None:
            self.store.put_result(self.job_id, result)
        self.buffer.ack(self.job_id, result.entry_ids)

    def _retrain_unsettled(self) -> None:
        """A step trained but never settled (the trainer died while publishing it, in the
        background or not): when weight-sync holds its version after all (the push ended,
        the result was not stored), take that version back and settle the step; else train
        it again from exactly the entries it took, and publish it. Retraining a version
        weight-sync holds would make another payload under the same number (the optimizer
        moments come from an older checkpoint), which weight-sync refuses."""
        mark = self.store.get_settling(self.job_id)
        if mark is None:
            return
        if mark.step != self.version or self.store.get_result(self.job_id, mark.step):
            self.store.clear_settling(self.job_id)  # it was published after all
            return
        if self._load_held(mark.version):
            logger.warning(
                "step %d's version reached weight-sync before the trainer died; taking it "
                "back (optimizer moments are older)",
                mark.step,
                extra={"job_id": self.job_id, "step": mark.step, "version": mark.version},
            )
            self.version, self.last_step = mark.version, mark.step
            mark.checkpoint_path = ""  # not written: the next checkpoint is due as usual
            self.store.settled(self.job_id, mark)
            self.buffer.ack(self.job_id, mark.entry_ids)
            return
        entries = self.buffer.claim(self.job_id, self.consumer, mark.entry_ids)
        if len(entries) != len(mark.entry_ids):
            raise FailedPrecondition(
                f"job {self.job_id}: step {mark.step} was trained and broadcast but not "
                f"published, and {len(mark.entry_ids) - len(entries)} of its "
                f"{len(mark.entry_ids)} samples are no longer in the buffer to train it again"
            )
        logger.warning(
            "step %d's version never reached weight-sync; training the "
            "step again from its %d samples",
            mark.step,
            len(entries),
            extra={"job_id": self.job_id, "step": mark.step},
        )
        self._unpublished = self._train(mark.step, entries)
        self._finish(self._unpublished)

    # ------------------------------------------------------------------ step
    def train_step(self, step: int, num_samples: int, *, background: bool = False) -> StepResult:
        """TrainStep(step): idempotent; publishes version step + 1 (``background``: once
        broadcast, weight-sync receives it while the caller goes on; see the docstring)."""
        if step < 0:
            raise InvalidArgument(f"step must be ≥ 0, got {step}")
        with self._lock:
            self._join_published()
            stored = self.store.get_result(self.job_id, step)
            if stored is not None:
                self.buffer.ack(self.job_id, stored.entry_ids)
                return stored
            if self.engine is None:
                raise FailedPrecondition(
                    f"job {self.job_id} is not initialised; call InitJob first"
                )
            if self._unpublished is not None and self._unpublished.step != step:
                raise FailedPrecondition(
                    f"step {self._unpublished.step} of job {self.job_id} is trained but not yet "
                    f"published; repeat TrainStep(step={self._unpublished.step}) first"
                )
            if self._unpublished is None:
                if step != self.version:
                    raise FailedPrecondition(
                        f"trainer holds version {self.version} of job {self.job_id}; step {step} "
                        f"needs version {step} (steps run in order from the version InitJob returned)"
                    )
                if num_samples < 1:
                    raise InvalidArgument(f"num_samples must be ≥ 1, got {num_samples}")
                previous = self.store.get_result(self.job_id, step - 1) if step > 0 else None
                if previous is not None:  # an earlier process stored it and died before the ack
                    self.buffer.ack(self.job_id, previous.entry_ids)
                entries = self._take(num_samples, step=step)
                self._unpublished = self._train(step, entries)
            return self._finish(self._unpublished, background=background)

    def wait_published(self) -> None:
        """Until weight-sync holds the version of a step published in the background."""
        with self._lock:
            self._join_published()

    def _train(self, step: int, entries: list[Entry]) -> StepResult:
        start = time.perf_counter()
        vocab = self.engine.vocab_size
        samples = [to_train_sample(e.sample, vocab_size=vocab) for e in entries]
        metrics = self.mirror.call(self.job_id, "update", samples, step)
        self.version, self.last_step = step + 1, step
        metrics["trainer_step_seconds"] = time.perf_counter() - start
        result = StepResult(
            step=step,
            version=step + 1,
            metrics=metrics,
            samples_trained=len(samples),
            entry_ids=[e.entry_id for e in entries],
        )
        if self._checkpoint_due(step):
            result.checkpoint_path = str(self.checkpoints.dir / f"step-{step}")
        return result

    def _finish(self, result: StepResult, *, background: bool = False) -> StepResult:
        """Publish, checkpoint (if due and missing), store, acknowledge — safe to repeat."""
        broadcast = _Broadcast(self._sender, result.version) if self._sender else None
        payload = self._gather(stream=broadcast)
        if broadcast is not None:
            try:
                result.metrics.update(broadcast.finish(payload))
            except BaseException:
                self._payloads.give(payload)
                raise
        if background and broadcast is not None and broadcast.ok and not result.checkpoint_path:
            # Every replica holds the version: weight-sync gets it while the next step runs.
            result.metrics["weights_published_in_background"] = 1.0
            self.store.put_settling(self.job_id, result)
            self._unpublished = None
            push = self._publisher.submit(self._publish_in_background, result, payload)
            self._settling = (result, payload, push)
            self._observe(result)
            return result
        try:
            # Marked first: a trainer that dies once weight-sync holds the version, before
            # the result is stored, leaves its successor the step to settle (see above).
            self.store.put_settling(self.job_id, result)
            self.publisher.publish(job_id=self.job_id, version=result.version, payload=payload)
            if result.checkpoint_path and not Path(result.checkpoint_path).is_dir():
                self._checkpoint(result, payload)
                payload = None  # the checkpoint writer gives it back when it is done
                if result.step == self.spec.steps - 1:  # the job's result: complete first
                    self.wait_checkpoint()
        finally:
            if payload is not None:
                self._payloads.give(payload)
        self.store.settled(self.job_id, result)
        self._unpublished = None
        self.buffer.ack(self.job_id, result.entry_ids)
        self._observe(result)
        return result

    def _publish_and_settle(self, result: StepResult, payload: Buffer) -> None:
        """Publishes a broadcast version to weight-sync, then stores the result and
        acknowledges its entries (the background thread; again in the foreground when
        that failed). The payload goes back only once weight-sync holds it."""
        start = time.perf_counter()
        self.publisher.publish(job_id=self.job_id, version=result.version, payload=payload)
        self.store.settled(self.job_id, result)
        self.buffer.ack(self.job_id, result.entry_ids)
        self._payloads.give(payload)
        prom.BACKGROUND_PUBLISH_SECONDS.labels(self.job_id).observe(time.perf_counter() - start)

    def _publish_in_background(self, result: StepResult, payload: Buffer) -> None:
        """The background thread's push (a foreground retry calls ``_publish_and_settle``
        itself). Fault tests (``RLFLEET_PUBLISH_PAUSE_S``): it waits before it starts."""
        if _PUBLISH_PAUSE_S > 0:
            logger.info("version %d: background publish paused %.2fs (%s)", result.version,
                        _PUBLISH_PAUSE_S, PUBLISH_PAUSE_ENV, extra={"job_id": self.job_id})  # fmt: skip
            time.sleep(_PUBLISH_PAUSE_S)
        self._publish_and_settle(result, payload)

    def _join_published(self) -> None:
        """Waits for the background publish of the previous step; one that failed (e.g.
        weight-sync was down) is repeated here, and its error raised if it fails again."""
        if self._settling is None:
            return
        result, payload, push = self._settling
        try:
            push.result()
        except Exception as exc:  # noqa: BLE001 - retried right here
            logger.warning(
                "publishing version %d in the background failed (%s); publishing it again",
                result.version,
                exc,
                extra={"job_id": self.job_id, "step": result.step},
            )
            self._publish_and_settle(result, payload)
        self._settling = None

    def _observe(self, result: StepResult) -> None:
        """The step's Prometheus series and log line."""
        prom.POLICY_VERSION.labels(self.job_id).set(result.version)
        prom.STEP_SECONDS.labels(self.job_id).observe(
            result.metrics.get("trainer_step_seconds", 0.0)
        )
        prom.TOKENS_TRAINED.labels(self.job_id).inc(result.metrics.get("tokens", 0.0))
        prom.SAMPLES_TRAINED.labels(self.job_id).inc(result.samples_trained)
        prom.record_step(self.job_id, result.metrics)
        logger.info(
            "step trained",
            extra={
                "job_id": self.job_id,
                "step": result.step,
                **{k: round(v, 6) for k, v in result.metrics.items()},
            },
        )

    # ------------------------------------------------------------------ buffer
    def _take(self, n: int, *, step: int) -> list[Entry]:
        """n entries: own pending (after a restart), reclaimed from dead consumers, then new."""
        taken: dict[str, Entry] = {}

        def add(entries: list[Entry]) -> None:
            for e in entries:
                if len(taken) < n:
                    taken.setdefault(e.entry_id, e)

        add(self.buffer.read_own_pending(self.job_id, self.consumer, count=n))
        if len(taken) < n:
            # XAUTOCLAIM may hand back our own idle entries too; ``taken`` dedupes them.
            add(
                self.buffer.reclaim(
                    self.job_id,
                    self.consumer,
                    min_idle_ms=int(self.reclaim_idle_s * 1000),
                    count=n - len(taken),
                )
            )
        deadline = time.monotonic() + self.read_timeout_s
        while len(taken) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FailedPrecondition(
                    f"only {len(taken)} of {n} samples for step {step} of job {self.job_id} "
                    f"arrived in the buffer within {self.read_timeout_s:.0f}s"
                )
            block_ms = max(1, int(min(left, 1.0) * 1000))
            add(
                self.buffer.read(
                    self.job_id, self.consumer, count=n - len(taken), block_ms=block_ms
                )
            )
        return list(taken.values())

    def _gather(self, stream: PayloadStream | None = None) -> Buffer:
        """The whole weights, a bucket at a time from every rank, in one payload (each
        bucket also to ``stream`` as soon as it is written)."""
        specs = self.mirror.call(self.job_id, "weight_specs")
        return gather_payload(specs, lambda names: self.mirror.call(self.job_id, "gather", names),
                              self._payloads.take, bucket_bytes=self.gather_bucket_bytes,
                              stream=stream)  # fmt: skip

    # ------------------------------------------------------------------ weight group
    def open_weight_group(self, world_size: int, backend: str = "") -> GroupAddress | None:
        """A new weight group for the job (the previous one is dropped); returns where its
        members meet. Versions trained from now on are broadcast over it. ``backend``:
        gloo (also ""), or nccl. World size 0 only closes the group (None)."""
        if world_size == 1 or world_size < 0:
            raise InvalidArgument(
                f"a weight group needs the trainer and at least one replica; world_size is "
                f"{world_size} (0 closes the job's group)"
            )
        backend = backend or "gloo"
        if backend not in BACKENDS:
            raise InvalidArgument(f"weight group backend {backend!r} is not one of "
                                  f"{', '.join(BACKENDS)}")  # fmt: skip
        if backend == "nccl" and self.device.type != "cuda":
            raise FailedPrecondition(
                f"this trainer trains on {self.device.type}; an nccl weight group needs a GPU "
                "(set weights.group_backend to gloo)"
            )
        with self._lock:
            if self._sender is not None:
                self._sender.close()
                self._sender = None
            if world_size == 0:
                logger.info("weight group closed", extra={"job_id": self.job_id})
                return None
            address = GroupAddress(self.weight_group_host, free_port(), world_size,
                                   time.time_ns() // 1000, backend)  # fmt: skip
            # nccl: staged through this rank's GPU; gloo: the host payload, in place.
            device = str(self.device) if backend == "nccl" else "cpu"
            self._sender = WeightSender(address, timeout_s=self.spec.weights.group_timeout_s,
                                        device=device)  # fmt: skip
        logger.info("weight group opened", extra={"job_id": self.job_id, "members": world_size,
                                                  "generation": address.generation,
                                                  "backend": backend})  # fmt: skip
        return address

    def _publish(self, version: int) -> None:
        payload = self._gather()
        try:
            self.publisher.publish(job_id=self.job_id, version=version, payload=payload)
        finally:
            self._payloads.give(payload)

    @property
    def model(self) -> torch.nn.Module | None:
        """The causal LM (this rank's shards when there are several)."""
        return self.engine.lm if self.engine is not None else None

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_due(self, step: int) -> bool:
        every = self.spec.checkpoint.every_steps
        return step == self.spec.steps - 1 or (every > 0 and (step + 1) % every == 0)

    def _checkpoint(self, result: StepResult, payload: Buffer) -> None:
        """Starts the checkpoint of ``result``'s step: every rank stages its optimizer
        shards (DCP writes them in the background); a thread of this rank waits for them,
        writes ``payload`` and the rest, renames the directory into place and gives the
        payload back. One at a time: the previous checkpoint is finished (or its failure
        logged) first. When this raises, the payload is still the caller's."""
        try:
            self.wait_checkpoint()
        except Exception:  # noqa: BLE001 - logged by the writer; this one may succeed
            pass
        start = time.perf_counter()
        tmp = self.checkpoints.begin(result.step)
        try:
            saving = self.mirror.call(self.job_id, "save_optimizer", str(tmp / OPTIMIZER_DIR))
        except BaseException:  # the caller still owns the payload
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        state = {
            "job_id": self.job_id,
            "spec": self.spec.model_dump(mode="json"),
            "result": result.to_dict(),
        }
        self._writing = self._writer.submit(
            self._write_checkpoint, tmp, result.step, payload, saving, state, start
        )

    def _write_checkpoint(self, tmp: Path, step: int, payload: Buffer, saving: Future,
                          state: dict, start: float) -> None:  # fmt: skip
        try:
            saving.result()
            path = self.checkpoints.commit(tmp, step=step, payload=payload, model=self.engine.lm,
                                           tokenizer_dir=self.spec.model.path, state=state)  # fmt: skip
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            logger.exception("checkpoint failed", extra={"job_id": self.job_id, "step": step})
            raise
        finally:
            self._payloads.give(payload)
        seconds = time.perf_counter() - start
        prom.CHECKPOINT_SECONDS.labels(self.job_id).observe(seconds)
        logger.info(
            "checkpoint written",
            extra={"job_id": self.job_id, "step": step, "path": str(path),
                   "seconds": round(seconds, 3)},
        )  # fmt: skip

    def wait_checkpoint(self) -> None:
        """Until the checkpoint being written is complete; raises its error."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()

    def close(self) -> None:
        """Lets a background publish and a checkpoint being written finish (their
        failures are logged; a publish left unfinished is retrained after a restart)."""
        try:
            self.wait_published()
        except Exception:  # noqa: BLE001
            logger.exception("background publish failed", extra={"job_id": self.job_id})
        try:
            self.wait_checkpoint()
        except Exception:  # noqa: BLE001
            pass
        self._publisher.shutdown(wait=True)
        self._writer.shutdown(wait=True)
        if self._sender is not None:
            self._sender.close()


class _Broadcast:
    """One version's broadcast over the weight group, fed bucket by bucket as the payload
    is gathered; any failure leaves the group (the version still goes to weight-sync)."""

    def __init__(self, sender: WeightSender, version: int):
        self.sender, self.version = sender, version
        self.ok = not sender.broken
        self.start = time.perf_counter()

    def begin(self, num_bytes: int) -> None:
        self.ok = self.ok and self.sender.begin(self.version, num_bytes)

    def send(self, payload: Buffer, start: int, end: int) -> None:
        self.ok = self.ok and self.sender.send(payload, start, end)

    def finish(self, payload: Buffer) -> dict[str, float]:
        """Ends the version with its checksum; the step metrics of the broadcast."""
        self.ok = self.ok and self.sender.end(checksum_of(payload))
        return {"weights_broadcast": float(self.ok),
                "weights_broadcast_seconds": time.perf_counter() - self.start}  # fmt: skip
