"""Publishing policy versions to weight-sync.

A version is one safetensors payload (``rlfleet.common.weights``), filled by
``gather_payload`` a bucket of whole tensors at a time: with several ranks each
bucket is all-gathered from the shards and copied into its slot, so no rank
holds the whole model twice (its shards, the payload and one bucket). The same
payload is pushed and, when a checkpoint is due, written as the checkpoint's
``model.safetensors``. It is pushed with ``WeightSyncClient``: over weight-sync's
data plane, or in chunks through ``WeightSyncService.PushVersion`` where there
is none. Weight-sync verifies the checksum before anything serves the version.
The payload holds every key of the model's state dict under its checkpoint name;
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
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch

from rlfleet.common.errors import NotFound
from rlfleet.common.weights import Buffer, PayloadLayout, checksum_of, decode_state_dict
from rlfleet.common.weightsync_client import WeightSyncClient

logger = logging.getLogger(__name__)

GATHER_BUCKET_BYTES = 512 * 1024 * 1024


def buckets(layout: PayloadLayout, bucket_bytes: int) -> Iterator[list[str]]:
    """Tensor names in payload order, grouped up to ``bucket_bytes`` (a larger tensor alone)."""
    bucket: list[str] = []
    size = 0
    for name, (_, n) in layout.slots.items():
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(name)
        size += n
    if bucket:
        yield bucket


class PayloadStream(Protocol):
    """Where a payload's bytes go as soon as they are final (a weight group)."""

    def begin(self, num_bytes: int) -> None: ...

    def send(self, payload: Buffer, start: int, end: int) -> None: ...


def gather_payload(
    specs: Iterable[tuple[str, Sequence[int], torch.dtype]],
    gather: Callable[[list[str]], dict[str, torch.Tensor]],
    alloc: Callable[[int], Buffer],
    *,
    bucket_bytes: int = GATHER_BUCKET_BYTES,
    stream: PayloadStream | None = None,
) -> Buffer:
    """A version's payload: laid out from ``specs`` (names, whole shapes, dtypes), then
    filled bucket by bucket with the whole tensors ``gather(names)`` returns. Buckets
    follow the payload's order, so each one's bytes are final once written: ``stream``
    gets the header, then every bucket, while the next is gathered."""
    layout = PayloadLayout.of(specs)
    payload = alloc(layout.size)
    layout.write_header(payload)
    if stream is not None:
        stream.begin(layout.size)
        stream.send(payload, 0, layout.data_start)
    for names in buckets(layout, bucket_bytes):
        got = gather(names)
        for name in names:
            layout.write(payload, name, got.pop(name))
        del got
        if stream is not None:
            first, last = layout.slots[names[0]], layout.slots[names[-1]]
            stream.send(payload, first[0], last[0] + last[1])
    return payload


class WeightPublisher(abc.ABC):
    """Where a new policy version goes once the optimizer step is done."""

    @abc.abstractmethod
    def publish(self, *, job_id: str, version: int, payload: Buffer) -> str:
        """Publishes ``payload`` (``gather_payload``) as ``version`` of ``job_id``; returns
        the checksum. The caller keeps the payload (it may go on to a checkpoint)."""

    @abc.abstractmethod
    def fetch(self, *, job_id: str, version: int) -> dict[str, torch.Tensor] | None:
        """A published version's weights, or None if it is not held (any more)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class NoPublisher(WeightPublisher):
    """Weight-sync disabled: versions are computed and reported, never sent."""

    def publish(self, *, job_id: str, version: int, payload: Buffer) -> str:
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
        self.client = WeightSyncClient(
            address,
            timeout_s=timeout_s,
            deadline_s=deadline_s if deadline_s is not None else 3 * timeout_s,
            max_message_mb=max_message_mb,
        )

    def publish(self, *, job_id: str, version: int, payload: Buffer) -> str:
        checksum = checksum_of(payload)
        held = self.client.push(job_id=job_id, version=version, payload=payload, checksum=checksum)
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
