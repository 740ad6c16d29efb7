"""Publishing policy versions to weight-sync.

The trainer encodes its state dict once (``rlfleet.common.weights``) and
pushes it with ``WeightSyncClient``: over weight-sync's data plane, or in
chunks through ``WeightSyncService.PushVersion`` where there is none.
Weight-sync verifies the checksum before anything serves the version. The
payload holds every key of the model's state dict under its Hugging Face name;
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

import torch

from rlfleet.common.errors import NotFound
from rlfleet.common.weight_transport import BufferPool
from rlfleet.common.weights import checksum_of, decode_state_dict, encode_state_dict_into
from rlfleet.common.weightsync_client import WeightSyncClient

logger = logging.getLogger(__name__)


def exportable_state_dict(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights with tied tensors copied apart (safetensors refuses shared storage)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in weights.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


class WeightPublisher(abc.ABC):
    """Where a new policy version goes once the optimizer step is done."""

    @abc.abstractmethod
    def publish(self, *, job_id: str, version: int, weights: dict[str, torch.Tensor]) -> str:
        """Publishes ``model``'s weights as ``version`` of ``job_id``; returns the checksum."""

    @abc.abstractmethod
    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        """A published version's weights, or None if it is not held (any more)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class NoPublisher(WeightPublisher):
    """Weight-sync disabled: versions are computed and reported, never sent."""

    def publish(self, *, job_id: str, version: int, weights: dict[str, torch.Tensor]) -> str:
        logger.info(
            "no weight-sync configured; version not published",
            extra={"job_id": job_id, "version": version},
        )
        return ""

    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        return None


class GrpcWeightPublisher(WeightPublisher):
    """Pushes versions to weight-sync (its data plane, or PushVersion streams)."""

    def __init__(
        self,
        address: str,
        *,
        timeout_s: float = 300.0,
        deadline_s: float | None = None,
        max_message_mb: int = 256,
    ):
        self.address = address
        # The payload of the last version: pushed and done with, it takes the next one.
        self.buffers = BufferPool(keep=1)
        self.client = WeightSyncClient(
            address,
            timeout_s=timeout_s,
            deadline_s=deadline_s if deadline_s is not None else 3 * timeout_s,
            max_message_mb=max_message_mb,
        )

    def publish(self, *, job_id: str, version: int, weights: dict[str, torch.Tensor]) -> str:
        payload = encode_state_dict_into(exportable_state_dict(weights), self.buffers.take)
        try:
            checksum = checksum_of(payload)
            held = self.client.push(
                job_id=job_id, version=version, payload=payload, checksum=checksum
            )
        finally:
            self.buffers.give(payload)  # the push is over: nothing reads it any more
        logger.info(
            "published policy version",
            extra={
                "job_id": job_id,
                "version": version,
                "bytes": len(payload),
                "checksum": checksum[:24],
            },
        )
        return held or checksum

    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        try:
            got = self.client.pull(job_id=job_id, version=version)
        except NotFound:
            return None
        return decode_state_dict(got.payload) if got.version == version else None

    def close(self) -> None:
        self.client.close()


def setup_publisher(kind: str, *, address: str = "", **kwargs) -> WeightPublisher:
    """Factory: ``grpc`` (weight-sync at ``address``) or ``none``."""
    if kind == "grpc":
        if not address:
            raise ValueError("the grpc weight publisher needs a weight-sync address")
        return GrpcWeightPublisher(address, **kwargs)
    if kind == "none":
        return NoPublisher()
    raise ValueError(f"unknown weight publisher kind {kind!r}; known: grpc, none")
