"""Wire format of a policy version: a safetensors payload split into chunks.

The trainer encodes its state dict once, streams it to weight-sync in chunks,
and the last chunk carries the checksum of the whole payload. Whoever assembles
a stream (weight-sync on push, a rollout replica on pull) verifies the checksum
before anything uses the weights, so a torn or corrupted version is refused.

Checksums name their algorithm: ``xxh3-128:<hex>`` (the default: it runs at
memory speed, ~18 GB/s on one core here, where sha256 manages ~1.5 GB/s and
would cost more than the transfer itself) or ``sha256:<hex>``; a bare 64-digit
hex string is sha256, as versions were tagged before. The checksum guards
against torn and corrupted transfers and bit rot; it is not a signature (TLS
and the network policies are what keep others from writing versions).

Two ways to handle chunks, one wire format. ``iter_chunks`` / ``assemble`` work
on ``WeightChunk`` messages, as the generated stubs do. Moving gigabytes that
way copies every byte several times in Python (slice, message, serialisation
on one side; parse, field access, join on the other), and on a CPU-bound host
those copies, not the socket, set the rate (bench/weightsync.py). The *frame*
functions move the same messages already serialised: ``encode_frames`` writes
each chunk's bytes straight from the payload into its frame (one copy),
``split_frame`` finds the data inside a received frame without copying it, and
``assemble_frames`` joins the data once. ``push_frames`` / ``pull_frames`` call
the service with pass-through serialisers, so either side can use frames while
the other uses messages. Faster still is the data plane beside gRPC
(``rlfleet.common.weight_transport``), which ``rlfleet.common.weightsync_client``
uses when weight-sync offers one.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash
from google.protobuf.message import DecodeError

from rlfleet.common.errors import DataLoss, InvalidArgument
from rlfleet.v1 import common_pb2, weightsync_pb2

if TYPE_CHECKING:
    import grpc
    import torch

CHUNK_BYTES = 4 * 1024 * 1024
PUSH_METHOD = "/rlfleet.v1.WeightSyncService/PushVersion"
PULL_METHOD = "/rlfleet.v1.WeightSyncService/PullVersion"
_DATA_FIELD = 4  # WeightChunk.data
_DATA_TAG = bytes([(_DATA_FIELD << 3) | 2])  # field 4, wire type 2 (length-delimited)


def encode_state_dict(state: dict[str, torch.Tensor]) -> bytes:
    """Serialises tensors (any device) to one safetensors payload."""
    from safetensors.torch import save as st_save  # torch only where tensors are handled

    return st_save({k: v.detach().to("cpu").contiguous() for k, v in state.items()})


# safetensors dtype names -> torch dtype attribute names.
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
_SAFETENSORS_NAMES = {attr: name for name, attr in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class PayloadLayout:
    """Where each tensor of a payload goes, decided from names, shapes and dtypes alone.

    So a payload can be filled tensor by tensor as the tensors become available: the
    sharded trainer gathers its weights a bucket at a time straight into the payload
    (``trainer/gather.py``) and never holds them whole twice. The layout is
    safetensors' own (header padded to 8 bytes, larger dtypes first so every tensor is
    aligned), and safetensors, transformers and vLLM read the payload as a file."""

    head: bytes
    slots: dict[str, tuple[int, int]]  # name -> (offset in the payload, bytes)
    size: int

    @classmethod
    def of(cls, specs: Iterable[tuple[str, Sequence[int], torch.dtype]]) -> PayloadLayout:
        ordered = sorted(specs, key=lambda s: (-s[2].itemsize, s[0]))
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in ordered:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": _SAFETENSORS_NAMES[str(dtype).removeprefix("torch.")],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            offset += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        base = 8 + len(head)
        slots = {
            name: (
                base + meta["data_offsets"][0],
                meta["data_offsets"][1] - meta["data_offsets"][0],
            )
            for name, meta in header.items()
            if name != "__metadata__"
        }
        return cls(head, slots, base + offset)

    @property
    def data_start(self) -> int:
        """Where the tensors begin: the 8-byte length and the header come before."""
        return 8 + len(self.head)

    def write_header(self, buf: Buffer) -> None:
        view = memoryview(buf).cast("B")
        struct.pack_into("<Q", view, 0, len(self.head))
        view[8 : 8 + len(self.head)] = self.head

    def write(self, buf: Buffer, name: str, tensor: torch.Tensor) -> None:
        """Copies ``tensor`` (any device) into its slot: its one copy on the way."""
        import torch

        offset, n = self.slots[name]
        if n != tensor.numel() * tensor.element_size():
            raise ValueError(f"tensor {name} does not match its slot in the payload layout")
        if n:
            view = memoryview(buf).cast("B")
            dst = torch.frombuffer(view, dtype=tensor.dtype, count=tensor.numel(), offset=offset)
            dst.copy_(tensor.detach().reshape(-1))


def encode_state_dict_into(
    state: dict[str, torch.Tensor], alloc: Callable[[int], Buffer]
) -> Buffer:
    """``encode_state_dict``, written into memory from ``alloc(num_bytes)``: each tensor
    is copied once, straight from where it lies (a GPU included), into the payload.

    The trainer publishes every step, and a fresh payload each time costs more than its
    transfer (``weight_transport.alloc_buffer``); given a pool's ``take``, steady-state
    publishing touches no new memory."""
    layout = PayloadLayout.of((k, v.shape, v.dtype) for k, v in state.items())
    buf = alloc(layout.size)
    layout.write_header(buf)
    for name, t in state.items():
        layout.write(buf, name, t)
    return buf


def decode_state_dict(payload: Buffer) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors payload.

    ``bytes`` go through safetensors (its tensors are copies). A writable buffer,
    what the data plane receives into, is read in place: the tensors are views of
    it (``torch.frombuffer``), so it must not be reused while they live. That
    saves two copies of every version on a replica, and fresh memory is costly to
    touch on a VM (``weight_transport.alloc_buffer``). Raises ValueError for a
    payload that is not safetensors.
    """
    import torch

    if isinstance(payload, bytes):
        from safetensors.torch import load as st_load

        return st_load(payload)
    view = memoryview(payload).cast("B")
    try:
        (header_len,) = struct.unpack_from("<Q", view, 0)
        header = json.loads(bytes(view[8 : 8 + header_len]))
        base, out = 8 + header_len, {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = getattr(torch, _SAFETENSORS_DTYPES[meta["dtype"]])
            begin, end = meta["data_offsets"]
            if not base + begin <= base + end <= len(view):
                raise ValueError(f"tensor {name} lies outside the payload")
            count = (end - begin) // dtype.itemsize
            flat = (
                torch.frombuffer(view, dtype=dtype, count=count, offset=base + begin)
                if count
                else torch.empty(0, dtype=dtype)
            )
            out[name] = flat.view(meta["shape"])
    except (struct.error, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"not a safetensors payload: {exc!r}") from None
    return out


# ----------------------------------------------------------------------------- checksums
Buffer = bytes | bytearray | memoryview | mmap.mmap  # collections.abc.Buffer from Python 3.12
CHECKSUM_ALGORITHMS = {"xxh3-128": xxhash.xxh3_128, "sha256": hashlib.sha256}
DEFAULT_CHECKSUM = "xxh3-128"


def checksum_algorithm(checksum: str) -> str:
    """The algorithm a checksum string names; raises InvalidArgument for one we don't know."""
    algo, sep, digest = checksum.rpartition(":")
    if not sep and len(checksum) == 64:
        return "sha256"  # untagged: how versions were tagged before the prefix
    if algo not in CHECKSUM_ALGORITHMS or not digest:
        known = ", ".join(f"{a}:<hex>" for a in CHECKSUM_ALGORITHMS)
        raise InvalidArgument(f"checksum {checksum[:40]!r} is not one of {known}")
    return algo


def checksum_of(parts: Sequence[Buffer] | Buffer, algo: str = DEFAULT_CHECKSUM) -> str:
    """The tagged checksum of a payload, given whole or as a list or tuple of its parts."""
    if algo not in CHECKSUM_ALGORITHMS:
        raise InvalidArgument(
            f"unknown checksum algorithm {algo!r}; known: {sorted(CHECKSUM_ALGORITHMS)}"
        )
    hasher = CHECKSUM_ALGORITHMS[algo]()
    for part in parts if isinstance(parts, list | tuple) else [parts]:
        hasher.update(part)  # both release the GIL on large buffers
    return f"{algo}:{hasher.hexdigest()}"


def verify_checksum(
    parts: Iterable[bytes | memoryview] | bytes, expected: str, *, what: str
) -> str:
    """Raises DataLoss unless the payload matches ``expected``; returns the checksum."""
    actual = checksum_of(parts, checksum_algorithm(expected))
    if actual.rpartition(":")[2] != expected.rpartition(":")[2]:
        raise DataLoss(f"{what}: checksum mismatch (got {actual[:24]}, expected {expected[:24]})")
    return actual


def _chunk_header(
    *, job_id: str, version: int, offset: int, last: bool, checksum: str, total: int
) -> weightsync_pb2.WeightChunk:
    return weightsync_pb2.WeightChunk(
        job_id=job_id,
        version=version,
        offset=offset,
        last=last,
        checksum=checksum if last else "",
        total_bytes=total if last else 0,
    )


def _offsets(total: int, chunk_bytes: int) -> range:
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be at least 1")
    return range(0, max(total, 1), chunk_bytes)


def iter_chunks(
    payload: bytes,
    *,
    job_id: str,
    version: int,
    checksum: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[weightsync_pb2.WeightChunk]:
    """``encode_frames`` as WeightChunk messages, for callers of the generated stubs."""
    frames = encode_frames(
        payload, job_id=job_id, version=version, checksum=checksum, chunk_bytes=chunk_bytes
    )
    return (weightsync_pb2.WeightChunk.FromString(frame) for frame in frames)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_frames(
    payload: bytes | memoryview,
    *,
    job_id: str,
    version: int,
    checksum: str | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> Iterator[bytes]:
    """The chunks of ``iter_chunks``, serialised: each frame is one WeightChunk on the wire.

    The data field is written after the other fields (protobuf readers accept
    fields in any order), straight from ``payload``: one copy per chunk.
    """
    view = memoryview(payload).cast("B")
    digest = checksum or checksum_of(view)
    total = len(view)
    offsets = _offsets(total, chunk_bytes)
    for i, offset in enumerate(offsets):
        data = view[offset : offset + chunk_bytes]
        head = _chunk_header(
            job_id=job_id,
            version=version,
            offset=offset,
            last=i == len(offsets) - 1,
            checksum=digest,
            total=total,
        ).SerializeToString()
        yield b"".join((head, _DATA_TAG, _varint(len(data)), data))


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def split_frame(frame: bytes | memoryview) -> tuple[weightsync_pb2.WeightChunk, memoryview]:
    """A serialised WeightChunk as (its fields but data, a view of its data) — data not copied.

    Walks the top-level fields of the message; the data field is cut out (the
    last one wins, as in any protobuf reader) and the rest, a few dozen bytes,
    is parsed as a WeightChunk. Raises InvalidArgument for a malformed frame.
    """
    buf = memoryview(frame).cast("B")
    rest: list[memoryview] = []
    data = buf[0:0]
    pos = start = 0
    try:
        while pos < len(buf):
            field_start = pos
            key, pos = _read_varint(buf, pos)
            field, wire = key >> 3, key & 7
            if wire == 0:
                _, pos = _read_varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            elif wire == 2:
                length, pos = _read_varint(buf, pos)
                if field == _DATA_FIELD:
                    rest.append(buf[start:field_start])
                    data = buf[pos : pos + length]
                    start = pos + length
                pos += length
            else:
                raise ValueError(f"unsupported wire type {wire}")
            if pos > len(buf):
                raise ValueError("field runs past the end of the frame")
        rest.append(buf[start:])
        header = weightsync_pb2.WeightChunk.FromString(b"".join(rest))
    except (ValueError, IndexError, DecodeError) as exc:
        raise InvalidArgument(f"a weight chunk is not a valid WeightChunk message: {exc}") from None
    return header, data


@dataclass(frozen=True)
class Assembled:
    """A verified version: its frames as they came and views of their data, in order."""

    job_id: str
    version: int
    checksum: str
    frames: tuple[bytes, ...]
    views: tuple[memoryview, ...]

    @property
    def num_bytes(self) -> int:
        return sum(len(v) for v in self.views)

    def payload(self) -> bytes:
        """The joined payload (one copy)."""
        return b"".join(self.views)

    def chunk_sizes_fit(self, chunk_bytes: int) -> bool:
        """True when every chunk but the last holds exactly ``chunk_bytes``, the last at most."""
        sizes = [len(v) for v in self.views]
        return all(n == chunk_bytes for n in sizes[:-1]) and (not sizes or sizes[-1] <= chunk_bytes)


def assemble_pieces(
    pieces: Iterable[tuple[weightsync_pb2.WeightChunk, memoryview, bytes]],
) -> Assembled:
    """Checks a stream of (fields, data, frame), then the checksum its last chunk names.

    Raises InvalidArgument for a malformed stream and DataLoss for a torn one or
    a checksum mismatch.
    """
    frames: list[bytes] = []
    views: list[memoryview] = []
    received = 0
    job_id, version, digest, total = "", -1, "", -1
    for chunk, data, frame in pieces:
        if version == -1:
            job_id, version = chunk.job_id, chunk.version
        elif (chunk.job_id, chunk.version) != (job_id, version):
            raise InvalidArgument("weight chunks of different versions were mixed in one stream")
        if chunk.offset != received:
            raise InvalidArgument(
                f"weight chunk at offset {chunk.offset} arrived, expected {received}"
            )
        frames.append(frame)
        views.append(data)
        received += len(data)
        if chunk.last:
            digest, total = chunk.checksum, chunk.total_bytes
            break
    if not digest:
        raise DataLoss(
            f"weight stream for version {version} ended before its last chunk (torn transfer)"
        )
    if total != received:
        raise DataLoss(f"version {version}: received {received} bytes, sender announced {total}")
    verify_checksum(views, digest, what=f"version {version}")
    return Assembled(job_id, version, digest, tuple(frames), tuple(views))


def assemble_frames(frames: Iterable[bytes]) -> tuple[str, int, bytes, str]:
    """``assemble`` over serialised chunks: data joined once."""
    got = assemble_pieces((*split_frame(f), f) for f in frames)
    return got.job_id, got.version, got.payload(), got.checksum


def assemble(chunks: Iterable[weightsync_pb2.WeightChunk]) -> tuple[str, int, bytes, str]:
    """Joins a chunk stream and verifies it; returns (job_id, version, payload, checksum).

    Raises InvalidArgument for a malformed stream and DataLoss when the payload
    does not match its checksum, so nothing half-received is ever used.
    """

    def pieces():
        for chunk in chunks:
            data = chunk.data  # a copy out of the message: take it once
            yield chunk, memoryview(data), data

    got = assemble_pieces(pieces())
    return got.job_id, got.version, got.payload(), got.checksum


# ----------------------------------------------------------------------------- calls
def push_frames(
    channel: grpc.Channel, frames: Iterable[bytes], *, timeout: float
) -> common_pb2.PolicyVersion:
    """``WeightSyncService.PushVersion`` with frames from ``encode_frames`` (no re-serialising)."""
    method = channel.stream_unary(
        PUSH_METHOD,
        request_serializer=None,
        response_deserializer=common_pb2.PolicyVersion.FromString,
    )
    return method(iter(frames), timeout=timeout)


def pull_frames(
    channel: grpc.Channel, request: weightsync_pb2.PullVersionRequest, *, timeout: float
) -> Iterator[bytes]:
    """``WeightSyncService.PullVersion`` answered as frames (no parsing of the data)."""
    method = channel.unary_stream(
        PULL_METHOD,
        request_serializer=weightsync_pb2.PullVersionRequest.SerializeToString,
        response_deserializer=None,
    )
    return method(request, timeout=timeout)
