"""Publishing policy versions to weight-sync.

The trainer encodes its state dict once (``rlfleet.common.weights``) and
streams it in chunks through ``WeightSyncService.PushVersion``; weight-sync
verifies the checksum of the last chunk before anything serves it. The
payload holds every key of ``model.state_dict()`` under its Hugging Face name;
tensors the model ties together (e.g. ``lm_head.weight`` and the input
embeddings) are written once per key, so any loader — strict
``load_state_dict`` or vLLM's ``load_weights`` — finds what it expects.

``fetch`` reads a published version back: after a crash, steps trained past
the newest checkpoint survive in weight-sync, and the trainer resumes from them.

The "none" publisher lets the trainer run without weight-sync (dry runs, unit
tests); the service picks it when no weight-sync address is configured.
"""

from __future__ import annotations

import abc
import logging

import grpc
import torch

from rlfleet.common.errors import from_rpc_error
from rlfleet.common.grpc_client import call, make_channel
from rlfleet.common.weights import (
    assemble,
    decode_state_dict,
    encode_state_dict,
    iter_chunks,
    sha256_hex,
)
from rlfleet.v1 import weightsync_pb2, weightsync_pb2_grpc

logger = logging.getLogger(__name__)


def exportable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with tied tensors copied apart (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


class WeightPublisher(abc.ABC):
    """Where a new policy version goes once the optimizer step is done."""

    @abc.abstractmethod
    def publish(self, *, job_id: str, version: int, model: torch.nn.Module) -> str:
        """Publishes ``model``'s weights as ``version`` of ``job_id``; returns the sha256."""

    @abc.abstractmethod
    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        """A published version's weights, or None if it is not held (any more)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class NoPublisher(WeightPublisher):
    """Weight-sync disabled: versions are computed and reported, never sent."""

    def publish(self, *, job_id: str, version: int, model: torch.nn.Module) -> str:
        logger.info(
            "no weight-sync configured; version not published",
            extra={"job_id": job_id, "version": version},
        )
        return ""

    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        return None


class GrpcWeightPublisher(WeightPublisher):
    """Client-streams the version to ``WeightSyncService.PushVersion``."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 300.0,
        deadline_s: float | None = None,
        max_message_mb: int = 256,
    ):
        self.address = address
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s if deadline_s is not None else 3 * timeout_s
        self.channel = make_channel(address, max_message_mb=max_message_mb)
        self.stub = weightsync_pb2_grpc.WeightSyncServiceStub(self.channel)

    def publish(self, *, job_id: str, version: int, model: torch.nn.Module) -> str:
        payload = encode_state_dict(exportable_state_dict(model))
        digest = sha256_hex(payload)

        # A stream can only be sent once, so each attempt builds its chunks anew;
        # ``call`` retries UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED only.
        def push(data: bytes, timeout: float):
            chunks = iter_chunks(data, job_id=job_id, version=version, sha256=digest)
            return self.stub.PushVersion(chunks, timeout=timeout)

        reply = call(push, payload, timeout=self.timeout_s, deadline=self.deadline_s)
        logger.info(
            "published policy version",
            extra={
                "job_id": job_id,
                "version": version,
                "bytes": len(payload),
                "sha256": digest[:12],
            },
        )
        return reply.sha256 or digest

    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        request = weightsync_pb2.PullVersionRequest(job_id=job_id, version=version)
        try:
            _, got, payload, _ = assemble(self.stub.PullVersion(request, timeout=self.timeout_s))
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise from_rpc_error(exc) from None
        return decode_state_dict(payload) if got == version else None

    def close(self) -> None:
        self.channel.close()


def setup_publisher(kind: str, *, address: str = "", **kwargs) -> WeightPublisher:
    """Factory: ``grpc`` (weight-sync at ``address``) or ``none``."""
    if kind == "grpc":
        if not address:
            raise ValueError("the grpc weight publisher needs a weight-sync address")
        return GrpcWeightPublisher(address, **kwargs)
    if kind == "none":
        return NoPublisher()
    raise ValueError(f"unknown weight publisher kind {kind!r}; known: grpc, none")
