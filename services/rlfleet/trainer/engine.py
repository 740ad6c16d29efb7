"""One job's policy on one trainer rank, and how rank 0 drives the others.

``PolicyEngine`` is rank-agnostic: the model (a ``LogprobHead`` around the causal LM,
FSDP2-sharded when there are several ranks), the optimizer, the reference model,
the update, and the weights and optimizer state as whole (gathered) dicts for
publishing and checkpoints. Every method is a collective: all ranks call it together.

``RankMirror`` makes that so. Rank 0 serves the gRPC API, reads the buffer and keeps
the books (``job.py``); each engine call it makes is first broadcast, as (job,
method, arguments), to the other ranks, which run nothing but ``RankMirror.serve``:
receive a call, run the same method on their own engine, repeat. Arguments only
rank 0 has (a state dict to load) are passed as ``main_only`` and reach the others
as None; the method broadcasts their tensors itself. With one rank there is no
process group and the mirror is a plain call.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from rlfleet.common.checkpoint_names import (
    checkpoint_specs,
    gather_in_checkpoint_names,
    to_model_names,
)
from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.batching import TrainSample
from rlfleet.trainer.checkpointing import enable_activation_checkpointing
from rlfleet.trainer.distributed import Ranks, join_alone, ranks, shard_model
from rlfleet.trainer.grpo import grpo_update
from rlfleet.trainer.logprobs import LogprobHead
from rlfleet.trainer.sft import sft_update

logger = logging.getLogger(__name__)


def pick_device(kind: str = "auto") -> torch.device:
    """This rank's device: its own GPU (LOCAL_RANK) when CUDA is there, else the CPU."""
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and ranks().world > 1:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def load_causal_lm(path: str | Path, *, dtype: str, device: torch.device) -> torch.nn.Module:
    """A Hugging Face causal LM in eval mode (no dropout: the θ and θ_old passes must see
    one function; gradients flow the same in eval mode)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype))
    model.config.use_cache = False
    return model.to(device).eval()


def _state_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


class PolicyEngine:
    """Model, optimizer and updates of one job on this rank (collective methods)."""

    def __init__(self, spec: JobSpec, device: torch.device):
        self.spec = spec
        self.device = device
        self.root: torch.nn.Module | None = None
        self.ref: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.sharded = False
        self._saving: Future | None = None
        self._checkpoint_group: dist.ProcessGroup | None = None

    @property
    def lm(self) -> torch.nn.Module:
        return self.root.lm

    def load(self, source: str) -> None:
        """The policy from ``source`` (a model or checkpoint directory), sharded when there
        are several ranks; a fresh AdamW over this rank's shards."""
        model, alg = self.spec.model, self.spec.algorithm
        compute = getattr(torch, model.dtype)
        # Offloading: built in host memory, where FSDP2 keeps the shards (a model that
        # needs offloading may not fit the GPU whole even for a moment).
        home = torch.device("cpu") if alg.cpu_offload else self.device
        lm = load_causal_lm(source, dtype=model.master_dtype, device=home)
        if alg.activation_checkpointing:
            enable_activation_checkpointing(lm)
        self.sharded = ranks().world > 1 or alg.cpu_offload
        if self.sharded:
            join_alone()  # one rank offloading: FSDP2 over a group of one
            self.root = shard_model(lm, compute_dtype=compute, cpu_offload=alg.cpu_offload)
        else:
            self.root = LogprobHead(lm)
        self.optimizer = torch.optim.AdamW(
            self.root.parameters(), lr=alg.lr, betas=tuple(alg.betas),
            weight_decay=alg.weight_decay,
        )  # fmt: skip
        if alg.kl_coef > 0:  # the reference: the base weights, sharded the same way
            ref = load_causal_lm(model.path, dtype=model.dtype, device=home)
            ref.requires_grad_(False)
            offload = alg.cpu_offload
            self.ref = shard_model(ref, cpu_offload=offload) if self.sharded else LogprobHead(ref)

    def update(self, samples: list[TrainSample], step: int) -> dict[str, float]:
        """The step's optimizer update(s) (``grpo.py`` or ``sft.py``); metrics on every rank."""
        update = sft_update if self.spec.algorithm.kind == "sft" else grpo_update
        return update(self.root, self.optimizer, samples, spec=self.spec, step=step,
                      device=self.device, pad_id=self.pad_id, ref_model=self.ref)  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return self.lm.get_input_embeddings().num_embeddings

    @property
    def pad_id(self) -> int:
        """Any valid token id works: padded positions are masked from attention and loss."""
        for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(self.lm.config, name, None)
            if isinstance(value, list):
                value = value[0] if value else None
            if isinstance(value, int) and value >= 0:
                return value
        return 0

    # -- weights and optimizer state (collectives) -----------------------------------
    def weight_specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, whole shape, dtype) of every tensor the published checkpoint holds, under
        the checkpoint's names (a MoE's fused experts per expert again:
        ``common/checkpoint_names.py``), from metadata: nothing is gathered (a sharded
        parameter knows its global shape)."""
        return [(n, shape, dtype) for n, (shape, dtype) in checkpoint_specs(self.lm).items()]

    def gather(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The whole tensors of the checkpoint ``names`` (a bucket) on rank 0; the others
        get {}. Every rank gathers the in-memory tensors they are made of."""
        return gather_in_checkpoint_names(self.lm, names, self._gather_model_names)

    def _gather_model_names(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Whole tensors by in-memory name. Sharded: each is all-gathered (every rank takes
        part), one bucket at a time, so no rank ever holds more than a bucket of whole
        tensors beside its shards. One rank: the live tensors (the caller copies them)."""
        state = self.lm.state_dict()
        main = ranks().main
        out = {}
        for name in names:
            t = state[name].detach()
            full = getattr(t, "full_tensor", None)
            if full is not None:
                t = full()
            if main:
                out[name] = t
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """All weights, whole, on rank 0 (others: {}): for tests and small models; the
        trainer publishes through ``gather`` a bucket at a time instead."""
        return self.gather([name for name, _, _ in self.weight_specs()])

    def load_weights(self, state: dict[str, torch.Tensor] | None) -> None:
        """Whole weights under checkpoint names (a published version; rank 0 passes them,
        the others None) into every rank's shards."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        if state is not None:
            state = to_model_names(self.lm, state)
        if not self.sharded:
            self.lm.load_state_dict(state, strict=True)
            return
        named = {f"lm.{k}": v for k, v in (state or {}).items()}
        set_model_state_dict(self.root, named, options=_state_options(broadcast_from_rank0=True))

    def save_optimizer(self, path: str) -> Future:
        """Starts writing AdamW's state to ``path`` as a torch.distributed.checkpoint, each
        rank its own shards; returns when the state is copied aside (DCP's staging), so the
        next step may change it while the files are written in the background. The
        write's collectives run on a gloo group of their own, never interleaved with the
        step's. Rank 0's future is done once every rank's shards and the metadata are
        written. A save waits for this rank's previous one first."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        self.wait_saved()
        if dist.is_initialized() and self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        state = {"optim": get_optimizer_state_dict(self.root, self.optimizer)}
        self._saving = dcp.async_save(state, checkpoint_id=path, no_dist=not dist.is_initialized(),
                                      process_group=self._checkpoint_group)  # fmt: skip
        return self._saving

    def wait_saved(self) -> None:
        if self._saving is not None:
            saving, self._saving = self._saving, None
            saving.result()

    def load_optimizer(self, path: str) -> None:
        """AdamW's state from a DCP directory written by any number of ranks."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        state = {"optim": get_optimizer_state_dict(self.root, self.optimizer)}
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        set_optimizer_state_dict(self.root, self.optimizer, state["optim"])

    def load_optimizer_state(self, state: dict[str, Any] | None) -> None:
        """The whole AdamW state of a checkpoint from before DCP (rank 0 passes it)."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if not self.sharded and state and any(isinstance(k, int) for k in state.get("state", {})):
            # Written by a trainer before ranks existed: keyed by parameter position.
            self.optimizer.load_state_dict(state)
            return
        options = _state_options(broadcast_from_rank0=self.sharded)
        set_optimizer_state_dict(self.root, self.optimizer, state or {}, options=options)


def _group_broken(exc: RuntimeError) -> bool:
    """Whether a collective failed because a peer is gone (not a bug in the call)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("gloo", "Connection reset", "NCCL", "Connection closed")
    )


class RankMirror:
    """Runs engine methods on every rank: rank 0 calls, the others ``serve``."""

    def __init__(self, *, device: torch.device):
        self.device = device
        self.here: Ranks = ranks()
        self.engines: dict[str, PolicyEngine] = {}
        self._lock = threading.Lock()  # one collective at a time from rank 0's threads

    def create(self, job_id: str, spec: JobSpec) -> None:
        self.call(job_id, "_create", spec.model_dump_json())

    def call(self, job_id: str, method: str, *args: Any, main_only: tuple = ()) -> Any:
        """``engine.method(*args, *main_only)`` on every rank; rank 0's result."""
        with self._lock:
            if self.here.world == 1:
                return self._run(job_id, method, (*args, *main_only))
            try:
                dist.broadcast_object_list([(job_id, method, args, len(main_only))], src=0)
                return self._run(job_id, method, (*args, *main_only))
            except RuntimeError as exc:
                if not _group_broken(exc):
                    raise
                # A rank died (kill -9, OOM): the process group cannot be mended. Leave,
                # so the whole trainer restarts (its supervisor: `rlfleet up`, Kubernetes)
                # and resumes; the step's samples stay pending and its result unstored.
                logger.critical("a trainer rank is gone (%s); the trainer exits to restart", exc)
                os._exit(75)

    def _run(self, job_id: str, method: str, args: tuple) -> Any:
        if method == "_create":
            self.engines[job_id] = PolicyEngine(JobSpec.model_validate_json(args[0]), self.device)
            return None
        if method == "_drop":
            engine = self.engines.pop(job_id, None)
            if engine is not None:
                engine.wait_saved()
            return None
        return getattr(self.engines[job_id], method)(*args)

    def drop(self, job_id: str) -> None:
        self.call(job_id, "_drop")

    def stop(self) -> None:
        """Tells the other ranks to leave ``serve`` (rank 0, at shutdown)."""
        if self.here.world > 1:
            with self._lock:
                try:
                    dist.broadcast_object_list([("", "_exit", (), 0)], src=0)
                except RuntimeError:  # the others went first (a signal to the whole group)
                    logger.info("trainer ranks already stopped")

    def serve(self) -> None:
        """The loop of a rank other than 0: run what rank 0 runs, until it says stop."""
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0)
            job_id, method, args, main_only = message[0]
            if method == "_exit":
                return
            try:
                self._run(job_id, method, (*args, *(None,) * main_only))
            except Exception:  # noqa: BLE001 - rank 0 sees the same error and reports it
                logger.exception("rank %d: %s of job %s failed", self.here.rank, method, job_id)
