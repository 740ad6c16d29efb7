"""Experience buffer throughput: rlfleet's RedisStreamBuffer against a raw redis-py loop.

Both sides run against the same real redis-server (started here, configured as
the local fleet configures it: append-only file, fsync every second), in the
same process, one after the other, on the same samples and batch sizes.

- raw: ``XADD`` of pre-serialised bytes in a non-transactional pipeline, then
  ``XREADGROUP`` + ``XACK``/``XDEL`` — the floor of moving those bytes through
  Redis Streams from Python, with no encoding, checks or dedupe.
- raw + protobuf: the same loop, encoding each Sample before XADD and decoding
  it after the read — so the last figure isolates the buffer's own logic.
- rlfleet: ``RedisStreamBuffer.append`` (protobuf encoding, the WATCH/MULTI
  transaction that dedupes by sample id and refuses overflow) then ``read``
  (protobuf decoding, format-version check) and ``ack`` — what reward and the
  trainer call.

A sample has a 256-token prompt and N completion tokens (ids, inference
log-probs, versions, completion text of ~4 characters per token), N from 1K to
32K. ``frac_of_raw`` = raw seconds / rlfleet seconds over the whole workload
(writes and reads of every size); per-size write and read fractions are
printed too.

Where the time goes: every run also times protobuf encoding and decoding of the
same samples on their own, which splits rlfleet's seconds into phases —
encode, XADD, XREADGROUP + XACK/XDEL, decode, and what is left (the buffer's own
logic: dedupe, capacity check, transaction). The phases go into the JSON
(``phases_s``, ``profile_top``) and are printed when the target is missed
(or with ``--profile``).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import _common
import redis
from rlfleet.common.buffer import GROUP, RedisStreamBuffer
from rlfleet.common.procs import redis_url_of, start_redis
from rlfleet.v1.common_pb2 import Sample

TARGET = 0.5  # issue #9: at least half of the raw loop's throughput
PROMPT_TOKENS = 256
BATCH_BYTES = 4 * 1024 * 1024  # the size of one append / one read, roughly


def make_samples(n: int, tokens: int, *, seed: int, tag: str) -> list[Sample]:
    rng = random.Random(seed)
    prompt = [rng.randrange(151_936) for _ in range(PROMPT_TOKENS)]
    # One completion body shared by the samples (building 32K-token protobufs
    # one by one in Python is slower than the buffer itself); ids still differ.
    completion = [rng.randrange(151_936) for _ in range(tokens)]
    logprobs = [-rng.random() * 4 for _ in range(tokens)]
    versions = [7] * tokens
    text = "".join(rng.choice("0123456789 +-*/=abcdefgh\n") for _ in range(4 * tokens))
    out = []
    for i in range(n):
        out.append(
            Sample(
                job_id="bench",
                sample_id=f"{tag}-{i}",
                group_id=f"{tag}-g{i // 8}",
                step=0,
                prompt_token_ids=prompt,
                completion_token_ids=completion,
                inference_logprobs=logprobs,
                token_versions=versions,
                reward=float(i % 2),
                finish_reason="stop",
                completion_text=text,
                task_json='{"question": "1 + 2 =", "answer": "3"}',
            )
        )
    return out


def run_raw(
    r: redis.Redis, stream: str, payloads: list, batch: int, *, codec: bool = False
) -> tuple[float, float]:
    """Write then read+ack every payload; returns (write_s, read_s).

    ``codec``: ``payloads`` are Sample messages, encoded before XADD and decoded
    after the read (the raw loop plus protobuf, none of the buffer's own logic).
    """
    r.delete(stream)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    start = time.perf_counter()
    for i in range(0, len(payloads), batch):
        pipe = r.pipeline(transaction=False)
        for pb in payloads[i : i + batch]:
            pipe.xadd(stream, {"v": b"1", "pb": pb.SerializeToString() if codec else pb})
        pipe.execute()
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    got = 0
    while got < len(payloads):
        reply = r.xreadgroup(GROUP, "c", {stream: ">"}, count=batch)
        entries = reply[0][1]
        ids = [eid for eid, _fields in entries]
        if codec:
            got += sum(1 for _eid, f in entries if Sample.FromString(f[b"pb"]).sample_id)
        else:
            got += sum(1 for _eid, fields in entries if fields[b"pb"])
        pipe = r.pipeline(transaction=True)
        pipe.xack(stream, GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
    read_s = time.perf_counter() - start
    r.delete(stream)
    return write_s, read_s


def run_ours(buf: RedisStreamBuffer, job: str, samples: list[Sample], batch: int):
    buf.delete_job(job)
    start = time.perf_counter()
    for i in range(0, len(samples), batch):
        written = buf.append(job, samples[i : i + batch])
        assert written == len(samples[i : i + batch])
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    got = 0
    while got < len(samples):
        entries = buf.read(job, "c", count=batch)
        got += sum(1 for e in entries if e.sample.completion_token_ids)
        buf.ack(job, [e.entry_id for e in entries])
    read_s = time.perf_counter() - start
    buf.delete_job(job)
    return write_s, read_s


def time_codec(samples: list[Sample]) -> tuple[float, float]:
    """Seconds to encode every sample, and to decode the encoded bytes: the protobuf
    share of rlfleet's append and read, which the raw loop does not pay."""
    start = time.perf_counter()
    payloads = [s.SerializeToString() for s in samples]
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    for pb in payloads:
        Sample.FromString(pb)
    return encode_s, time.perf_counter() - start


def phases(raw: list[float], codec: list[float], ours: list[float]) -> dict[str, float]:
    """rlfleet's seconds (all sizes, best runs) split by what each part costs alone.

    ``raw`` and ``ours`` are [write, read] seconds, ``codec`` [encode, decode]. The
    rest of each side (ours minus transport minus protobuf) is the buffer's own work;
    it can come out slightly negative when noise favours rlfleet's run."""
    return {
        "protobuf encode": codec[0],
        "XADD (pipeline, pre-serialised)": raw[0],
        "buffer logic, write (dedupe, capacity, WATCH/MULTI)": ours[0] - raw[0] - codec[0],
        "XREADGROUP + XACK/XDEL": raw[1],
        "protobuf decode": codec[1],
        "buffer logic, read (format check, ack)": ours[1] - raw[1] - codec[1],
    }


def phase_lines(split: dict[str, float]) -> list[str]:
    total = sum(split.values())
    return [f"{name}: {sec:.3f} s ({sec / total:.0%})" for name, sec in split.items()]


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=0, help="runs per side (best is kept)")
    p.add_argument(
        "--profile", action="store_true", help="print the phases even when the target is met"
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    sizes = [1024, 8192, 32768] if args.quick else [1024, 4096, 16384, 32768]
    total_mb = 48 if args.quick else 128  # written per size and side
    repeats = args.repeats or (2 if args.quick else 3)
    print(f"experience buffer bench ({_common.load_note()}); best of {repeats} runs per side")

    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-buffer-") as tmp:
        proc = start_redis(Path(tmp))
        try:
            url = redis_url_of(proc)
            r = redis.Redis.from_url(url)
            buf = RedisStreamBuffer(redis.Redis.from_url(url), max_len=1_000_000)
            rows, per_size = [], []
            raw_total = codec_total = ours_total = 0.0
            split_raw, split_pb, split_ours = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
            for tokens in sizes:
                probe = make_samples(1, tokens, seed=tokens, tag="probe")[0]
                size_b = probe.ByteSize()
                n = max(16, int(total_mb * 2**20 / size_b))
                batch = max(4, min(64, BATCH_BYTES // size_b))
                n -= n % batch
                raw_best = [float("inf")] * 2
                codec_best = [float("inf")] * 2
                ours_best = [float("inf")] * 2
                pb_best = [float("inf")] * 2
                for rep in range(repeats):
                    samples = make_samples(n, tokens, seed=tokens, tag=f"t{tokens}-r{rep}")
                    pb_best = [min(a, b) for a, b in zip(pb_best, time_codec(samples), strict=True)]
                    payloads = [s.SerializeToString() for s in samples]
                    # Alternate the order so neither side always runs on a warmer server.
                    order = ("raw", "codec", "ours") if rep % 2 == 0 else ("ours", "codec", "raw")
                    for side in order:
                        if side == "raw":
                            w, rd = run_raw(r, f"bench:raw:{tokens}", payloads, batch)
                            raw_best = [min(raw_best[0], w), min(raw_best[1], rd)]
                        elif side == "codec":
                            w, rd = run_raw(r, f"bench:pb:{tokens}", samples, batch, codec=True)
                            codec_best = [min(codec_best[0], w), min(codec_best[1], rd)]
                        else:
                            w, rd = run_ours(buf, f"ours-{tokens}-{rep}", samples, batch)
                            ours_best = [min(ours_best[0], w), min(ours_best[1], rd)]
                    del samples, payloads
                mb = n * size_b / 2**20
                raw_total += sum(raw_best)
                codec_total += sum(codec_best)
                ours_total += sum(ours_best)
                for acc, best in (
                    (split_raw, raw_best),
                    (split_pb, pb_best),
                    (split_ours, ours_best),
                ):
                    acc[0] += best[0]
                    acc[1] += best[1]
                entry = {
                    "tokens": tokens,
                    "sample_bytes": size_b,
                    "samples": n,
                    "batch": batch,
                    "raw_write_samples_per_s": n / raw_best[0],
                    "raw_read_samples_per_s": n / raw_best[1],
                    "ours_write_samples_per_s": n / ours_best[0],
                    "ours_read_samples_per_s": n / ours_best[1],
                    "raw_write_mb_per_s": mb / raw_best[0],
                    "raw_read_mb_per_s": mb / raw_best[1],
                    "ours_write_mb_per_s": mb / ours_best[0],
                    "ours_read_mb_per_s": mb / ours_best[1],
                    "frac_write": raw_best[0] / ours_best[0],
                    "frac_read": raw_best[1] / ours_best[1],
                    "raw_pb_write_samples_per_s": n / codec_best[0],
                    "raw_pb_read_samples_per_s": n / codec_best[1],
                    "frac_of_raw_pb_write": codec_best[0] / ours_best[0],
                    "frac_of_raw_pb_read": codec_best[1] / ours_best[1],
                    "protobuf_encode_s": pb_best[0],
                    "protobuf_decode_s": pb_best[1],
                    "load": _common.load(),
                }
                per_size.append(entry)
                for op in ("write", "read"):
                    rows.append(
                        [
                            tokens,
                            op,
                            entry[f"raw_{op}_samples_per_s"],
                            entry[f"ours_{op}_samples_per_s"],
                            entry[f"raw_{op}_mb_per_s"],
                            entry[f"ours_{op}_mb_per_s"],
                            entry[f"frac_{op}"],
                            entry[f"frac_of_raw_pb_{op}"],
                            _common.load()["loadavg_1m"],
                        ]
                    )
        finally:
            proc.stop()

    print(
        _common.table(
            [
                "tokens",
                "op",
                "raw smp/s",
                "ours smp/s",
                "raw MB/s",
                "ours MB/s",
                "ours/raw",
                "ours/raw+pb",
                "load",
            ],
            rows,
        )
    )
    frac = raw_total / ours_total
    frac_pb = codec_total / ours_total
    frac_min = min(min(e["frac_write"], e["frac_read"]) for e in per_size)
    print(
        f"frac_of_raw = raw seconds / rlfleet seconds over all writes and reads = {frac:.3f} "
        f"(lowest single figure {frac_min:.3f}; target >= {TARGET})\n"
        f"against the raw loop plus protobuf encoding/decoding (what the buffer's own logic "
        f"costs: dedupe, capacity check, transaction): {frac_pb:.3f}"
    )
    split = phases(split_raw, split_pb, split_ours)
    where = phase_lines(split)
    if frac < TARGET or args.profile:
        verdict = f"missed by {1 - frac / TARGET:.0%}" if frac < TARGET else "met"
        print(f"where rlfleet's {split_ours[0] + split_ours[1]:.2f} s go (target {verdict}):")
        print("\n".join(f"  {line}" for line in where))
    payload = _common.report(
        "buffer",
        quick=args.quick,
        started=started,
        frac_of_raw=round(frac, 4),
        frac_of_raw_min=round(frac_min, 4),
        frac_of_raw_with_protobuf=round(frac_pb, 4),
        phases_s={k: round(v, 4) for k, v in split.items()},
        profile_top=where,
        per_size=per_size,
        definition="frac_of_raw = total raw seconds / total rlfleet seconds (write + read + ack, all sizes)",
    )
    _common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
