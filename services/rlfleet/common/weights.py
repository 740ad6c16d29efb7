"""Wire format of a policy version: a safetensors payload split into chunks.

The trainer encodes its state dict once, streams it to weight-sync in chunks,
and the last chunk carries the sha256 of the whole payload. Whoever assembles a
stream (weight-sync on push, a rollout replica on pull) verifies the checksum
before anything uses the weights, so a torn or corrupted version is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from rlfleet.common.errors import DataLoss, InvalidArgument
from rlfleet.v1 import weightsync_pb2

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 4 * 1024 * 1024


def encode_state_dict(state: dict[str, torch.Tensor]) -> bytes:
    """Serialises tensors (any device) to one safetensors payload."""
    from safetensors.torch import save as st_save  # torch only where tensors are handled

    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


def decode_state_dict(payload: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    return st_load(payload)


def sha256_hex(payload: bytes | memoryview) -> str:
    return hashlib.sha256(payload).hexdigest()


def iter_chunks(
    payload: bytes,
    *,
    job_id: str,
    version: int,
    sha256: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[weightsync_pb2.WeightChunk]:
    """Splits a payload into WeightChunk messages; the last one carries the checksum."""
    digest = sha256 or sha256_hex(payload)
    view = memoryview(payload)
    total = len(payload)
    offsets = range(0, max(total, 1), chunk_bytes)
    for i, offset in enumerate(offsets):
        last = i == len(offsets) - 1
        yield weightsync_pb2.WeightChunk(
            job_id=job_id,
            version=version,
            offset=offset,
            data=bytes(view[offset : offset + chunk_bytes]),
            last=last,
            sha256=digest if last else "",
            total_bytes=total if last else 0,
        )


def assemble(chunks: Iterable[weightsync_pb2.WeightChunk]) -> tuple[str, int, bytes, str]:
    """Joins a chunk stream and verifies it; returns (job_id, version, payload, sha256).

    Raises InvalidArgument for a malformed stream and DataLoss when the payload
    does not match its checksum, so nothing half-received is ever used.
    """
    buf = bytearray()
    job_id, version, digest, total = "", -1, "", -1
    for chunk in chunks:
        if version == -1:
            job_id, version = chunk.job_id, chunk.version
        elif (chunk.job_id, chunk.version) != (job_id, version):
            raise InvalidArgument("weight chunks of different versions were mixed in one stream")
        if chunk.offset != len(buf):
            raise InvalidArgument(
                f"weight chunk at offset {chunk.offset} arrived, expected {len(buf)}"
            )
        buf += chunk.data
        if chunk.last:
            digest, total = chunk.sha256, chunk.total_bytes
            break
    if not digest:
        raise DataLoss(
            f"weight stream for version {version} ended before its last chunk (torn transfer)"
        )
    if total != len(buf):
        raise DataLoss(f"version {version}: received {len(buf)} bytes, sender announced {total}")
    payload = bytes(buf)
    actual = sha256_hex(payload)
    if actual != digest:
        raise DataLoss(
            f"version {version}: checksum mismatch (got {actual[:12]}, expected {digest[:12]})"
        )
    return job_id, version, payload, digest
