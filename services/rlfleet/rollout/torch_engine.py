"""Plain PyTorch rollout engine over a Hugging Face causal LM.

One engine thread owns the model and runs a continuous batch: sequences of every
Generate call queued at the same time are admitted together, and calls that
arrive while a batch decodes join it at the next step (their prompts are
prefilled on their own, then their KV cache rows are left-padded and appended).
Finished rows leave the batch at once, and padding columns no live row needs are
trimmed, so a varying-length workload is not decoded until its longest sequence
ends, which is what makes this faster than ``transformers``' ``generate``.

Weight swaps take the same lock as one decode step, so a step runs entirely on
old or entirely on new weights; tokens sampled after the swap record the new
version. The KV cache of sequences in flight is kept (it was computed under the
old weights), as in interruptible rollout systems. So is that of a batch an
Abort stopped whole, when its calls asked for it (``Sampling.resume_kv``): the
calls that resume its sequences decode on from it without a prefill (``parked``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from rlfleet.common.checkpoint_names import to_model_names
from rlfleet.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from rlfleet.rollout import metrics
from rlfleet.rollout.engine import (
    FINISH_ABORTED,
    FINISH_LENGTH,
    FINISH_STOP,
    GenerateCall,
    ResultCallback,
    RolloutEngine,
    Sampling,
    SeqRequest,
    SeqResult,
    require_model_dir,
    run_on_engine_thread,
    validate_generate,
)
from rlfleet.rollout.kvbatch import KVBatch, Row
from rlfleet.rollout.parked import ParkedBatch
from rlfleet.rollout.sampling import row_rng

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


class TorchEngine(RolloutEngine):
    """Continuous-batching sampler over ``AutoModelForCausalLM`` with a DynamicCache."""

    kind = "torch"

    @property
    def weights_device(self) -> str:
        if self.device.type == "cuda" and self.device.index is None:
            return f"cuda:{torch.cuda.current_device()}"
        return str(self.device)

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        max_batch_seqs: int = 256,
        max_prefill_tokens: int = 16384,
        logit_noise_std: float = 0.0,
    ):
        if logit_noise_std < 0:
            raise ValueError(f"logit_noise_std must be ≥ 0, got {logit_noise_std}")
        self.logit_noise_std = logit_noise_std
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_batch_seqs = max_batch_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self._model = None
        self._model_path = ""
        self._version = 0
        self._vocab_size = 0
        self._eos: frozenset[int] = frozenset()
        self._max_positions: int | None = None
        self._loading = False
        # Held for one forward+sample step and for a weight swap: the atomicity unit.
        self._weights_lock = threading.Lock()
        self._cv = threading.Condition()
        self._pending: deque[GenerateCall] = deque()
        self._live = 0
        self._started: set[GenerateCall] = set()  # calls with admitted sequences, not yet done
        self._parked: ParkedBatch | None = None  # set by the engine thread (see parked.py)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="torch-engine", daemon=True)
        self._thread.start()

    # -- model and weights ------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def model_path(self) -> str:
        return self._model_path

    @property
    def version(self) -> int:
        return self._version

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def running_sequences(self) -> int:
        with self._cv:
            return self._live + sum(len(c.seqs) - c.next_index for c in self._pending)

    def load_model(self, model_path: str) -> None:
        require_model_dir(model_path)
        path = Path(model_path)
        with self._cv:
            if self._started or self._pending:
                raise FailedPrecondition(
                    f"cannot switch to model {model_path!r} while "
                    f"{self.running_sequences} sequences are generating; call Abort first"
                )
            if self._loading:
                raise Unavailable("another model is being loaded; retry shortly")
            self._loading = True
        try:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
            model.to(self.device).eval()
            model.requires_grad_(False)
            config = model.config
            eos = config.eos_token_id
            gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
            ids = {*_as_list(eos), *_as_list(gen_eos)}
            with self._weights_lock:
                self._parked = None  # its KV cache belongs to the old model
                self._model = model
                self._model_path = str(path)
                self._version = 0
                self._vocab_size = int(model.get_input_embeddings().weight.shape[0])
                self._eos = frozenset(ids)
                self._max_positions = getattr(config, "max_position_embeddings", None)
            logger.info(
                "model loaded",
                extra={
                    "model_path": str(path),
                    "device": str(self.device),
                    "dtype": str(self.dtype),
                    "logit_noise_std": self.logit_noise_std,
                },
            )
        finally:
            with self._cv:
                self._loading = False

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        model = self._model
        if model is None:
            raise FailedPrecondition("no model is loaded; load a model before its weights")
        # A version carries checkpoint names (a MoE's experts one by one); the model in
        # memory may fuse them (transformers 5): convert as from_pretrained would.
        state = to_model_names(model, state)
        target = model.state_dict()  # tensors share storage with the live parameters
        unknown = sorted(set(state) - set(target))
        if unknown:
            raise FailedPrecondition(
                f"version {version} holds tensors the model {self._model_path!r} does not have: "
                f"{', '.join(unknown[:5])}"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(target[name].shape):
                raise FailedPrecondition(
                    f"version {version}: tensor {name} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(target[name].shape)}"
                )
        # A tensor may be left out only when it is tied to one that is present (lm_head).
        given = {target[name].data_ptr() for name in state}
        missing = sorted(n for n in set(target) - set(state) if target[n].data_ptr() not in given)
        if missing:
            raise FailedPrecondition(
                f"version {version} lacks tensors of the model: {', '.join(missing[:5])}"
            )
        with self._weights_lock, torch.no_grad():
            for name, tensor in state.items():
                target[name].copy_(tensor)
            self._version = int(version)
        logger.info("weights swapped", extra={"version": int(version), "tensors": len(state)})

    def drop_kept_kv(self) -> None:
        self._parked = None  # the engine thread claims from the object it matched against

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        seqs: Sequence[SeqRequest],
        sampling: Sampling,
        *,
        abort: threading.Event,
        on_result: ResultCallback,
    ) -> None:
        if self._model is None:
            raise FailedPrecondition("no model is loaded on this replica; call LoadVersion first")
        validate_generate(seqs, sampling, vocab_size=self._vocab_size)
        if self._max_positions:
            for i, seq in enumerate(seqs):
                n = len(seq.prompt_token_ids) + len(seq.prefix_token_ids)
                if n >= self._max_positions:
                    raise InvalidArgument(
                        f"sequences[{i}]: prompt and prefix hold {n} tokens, the model's context "
                        f"is {self._max_positions}"
                    )
        if not seqs:
            return
        run_on_engine_thread(
            self, GenerateCall(list(seqs), sampling, abort, on_result, outstanding=len(seqs))
        )

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    # -- engine thread ----------------------------------------------------------------

    def _loop(self) -> None:
        batch: KVBatch | None = None
        while True:
            with self._cv:
                while not self._closed and batch is None and not self._pending:
                    if self._parked is not None and self._parked.expired():
                        self._parked = None
                    self._cv.wait(timeout=ParkedBatch.TTL_S if self._parked else None)
                if self._closed:
                    break
            try:
                batch = self._iteration(batch)
            except Exception as exc:  # noqa: BLE001 - fail the calls involved, keep serving
                logger.exception("generation step failed")
                batch = None
                self._fail_started(exc)
        # Shutting down: nobody will run what is left.
        with self._cv:
            self._pending.clear()
        self._fail_started(Unavailable("the rollout engine shut down"))

    def _fail_started(self, exc: BaseException) -> None:
        """Ends every call that had sequences admitted (their rows are gone) with ``exc``."""
        with self._cv:
            calls = list(self._started)
            for call in calls:
                if call in self._pending:
                    self._pending.remove(call)
            self._started.clear()
            self._live = 0
        for call in calls:
            call.error = exc
            call.done.set()

    def _iteration(self, batch: KVBatch | None) -> KVBatch | None:
        """One unit of work: hand back aborted rows, admit queued ones or decode one token."""
        batch = self._drop_aborted(batch)
        self._abort_pending()
        live = len(batch.rows) if batch else 0
        can_join = batch is None or batch.can_merge
        parked = self._parked
        if parked is not None and parked.expired():
            parked = self._parked = None
        new_rows, resumed = (
            self._admit(self.max_batch_seqs - live, parked) if can_join else ([], [])
        )
        if resumed:
            self._parked = None  # claimed once: the rows it held now run (or are dropped)
            added = parked.claim(resumed)
            metrics.KV_RESUMED.inc(len(resumed))
            if added is not None:
                batch = added if batch is None else batch.merge(added)
        if new_rows:
            for chunk in _by_length(new_rows):
                start = time.perf_counter()
                with self._weights_lock:
                    added = KVBatch.prefill(
                        self._model,
                        chunk,
                        device=self.device,
                        version=self._version,
                        logit_noise_std=self.logit_noise_std,
                    )
                _count_pass("prefill", len(chunk), start)
                added = self._settle(added)
                if added is not None:
                    batch = added if batch is None else batch.merge(added)
        elif batch is not None and not resumed:
            start = time.perf_counter()
            with self._weights_lock:
                batch.decode(self._model, version=self._version)
            _count_pass("decode", len(batch.rows), start)
            batch = self._settle(batch)
        with self._cv:
            self._live = len(batch.rows) if batch else 0
        return batch

    def _admit(
        self, capacity: int, parked: ParkedBatch | None
    ) -> tuple[list[Row], list[tuple[int, Row]]]:
        """Takes queued sequences, in arrival order, up to the batch and prefill limits:
        rows to prefill, and rows that resume a row of ``parked`` (its index) from its cache."""
        rows: list[Row] = []
        resumed: list[tuple[int, Row]] = []
        over: list[tuple[Row, str]] = []  # already at their end: handed back, not prefilled
        longest = 0
        with self._cv:
            while self._pending and len(rows) + len(resumed) < capacity:
                call = self._pending[0]
                seq = call.seqs[call.next_index]
                row = self._new_row(call, seq)
                at = parked.match(row) if parked is not None else None
                n = len(seq.prompt_token_ids) + len(seq.prefix_token_ids)
                if (
                    at is None
                    and rows
                    and max(longest, n) * (len(rows) + 1) > self.max_prefill_tokens
                ):
                    break
                call.next_index += 1
                if call.next_index == len(call.seqs):
                    self._pending.popleft()
                self._started.add(call)
                reason = self._end_reason(row)
                if reason:
                    over.append((row, reason))
                elif at is not None:
                    resumed.append((at, row))
                else:
                    rows.append(row)
                    longest = max(longest, n)
        # Callbacks run outside the lock: a caller may call generate() from on_result.
        for row, reason in over:
            self._emit(row, finished=True, reason=reason)
        return rows, resumed

    def _new_row(self, call: GenerateCall, seq: SeqRequest) -> Row:
        sampling = call.sampling
        limit = seq.limit(sampling)
        if self._max_positions:
            limit = min(limit, self._max_positions - len(seq.prompt_token_ids))
        row = _row(call, seq, limit=limit)
        row.rng = row_rng(sampling.seed, seq.seq_id, len(seq.prefix_token_ids))
        row.temperature = sampling.temperature
        row.top_p = sampling.top_p if 0.0 < sampling.top_p < 1.0 else 1.0
        return row

    def _end_reason(self, row: Row) -> str:
        """ "stop" after EOS, "length" at the limit, "" while the row goes on."""
        if row.tokens and row.tokens[-1] in self._eos:
            return FINISH_STOP
        if len(row.tokens) >= row.limit:
            return FINISH_LENGTH
        return ""

    def _settle(self, batch: KVBatch) -> KVBatch | None:
        """Hands back rows whose last token ended them and drops them from the batch."""
        keep = []
        for i, row in enumerate(batch.rows):
            reason = self._end_reason(row)
            if reason:
                self._emit(row, finished=True, reason=reason)
            else:
                keep.append(i)
        return batch.select(keep)

    def _drop_aborted(self, batch: KVBatch | None) -> KVBatch | None:
        """Hands back the rows of aborted calls; a batch stopped whole is kept for the
        calls that resume it when they asked for that (``parked.py``)."""
        if batch is None or not any(row.call.abort.is_set() for row in batch.rows):
            return batch
        keep = []
        for i, row in enumerate(batch.rows):
            if row.call.abort.is_set():
                self._emit(row, finished=False, reason=FINISH_ABORTED)
            else:
                keep.append(i)
        if not keep and ParkedBatch.keeps(batch):
            self._parked = ParkedBatch(batch)
            return None
        return batch.select(keep)

    def _abort_pending(self) -> None:
        """Hands back, untouched, the queued sequences of aborted calls."""
        with self._cv:
            aborted = [c for c in self._pending if c.abort.is_set()]
            for call in aborted:
                self._pending.remove(call)
                self._started.add(call)
        for call in aborted:
            rest, call.next_index = call.seqs[call.next_index :], len(call.seqs)
            for seq in rest:
                self._emit(_row(call, seq, limit=0), finished=False, reason=FINISH_ABORTED)

    def _emit(self, row: Row, *, finished: bool, reason: str) -> None:
        call = row.call
        result = SeqResult(
            seq_id=row.req.seq_id,
            token_ids=row.tokens,
            logprobs=row.logprobs,
            versions=row.versions,
            finished=finished,
            finish_reason=reason,
            num_prefix_tokens=len(row.req.prefix_token_ids),
        )
        if call.deliver(result):
            with self._cv:
                self._started.discard(call)
            call.done.set()


PREFILL_PADDING = 0.25
"""Most padding a prefill pass may carry, as a share of its real tokens."""


def _by_length(rows: list[Row]) -> list[list[Row]]:
    """Admitted rows in prefill passes of similar lengths. Rows are left-padded to the
    longest of their pass, and a resumed rollout (prompt + a long prefix) admitted with
    fresh prompts would otherwise make every one of them pay its length."""

    def length(row: Row) -> int:
        return len(row.req.prompt_token_ids) + len(row.req.prefix_token_ids)

    chunks: list[list[Row]] = []
    chunk: list[Row] = []
    real = 0
    for row in sorted(rows, key=length):
        n = length(row)  # the longest so far: rows are sorted
        if chunk and n * (len(chunk) + 1) > (1 + PREFILL_PADDING) * (real + n):
            chunks.append(chunk)
            chunk, real = [], 0
        chunk.append(row)
        real += n
    if chunk:
        chunks.append(chunk)
    return chunks


def _count_pass(kind: str, rows: int, start: float) -> None:
    metrics.ENGINE_PASSES.labels(kind).inc()
    metrics.ENGINE_PASS_ROWS.labels(kind).inc(rows)
    metrics.ENGINE_PASS_SECONDS.labels(kind).inc(time.perf_counter() - start)


def _row(call: GenerateCall, seq: SeqRequest, *, limit: int) -> Row:
    return Row(
        call,
        seq,
        list(seq.prefix_token_ids),
        list(seq.prefix_logprobs),
        list(seq.prefix_versions),
        limit,
        None,
    )


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
