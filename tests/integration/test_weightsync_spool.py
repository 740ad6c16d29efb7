"""The weight-sync process with a spool (issue #16, item 2): versions in mapped spool
files, at most keep_versions (default 2) of them, and a ``kill -9`` right after a push
loses no acknowledged version, although its fsync runs in the background.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from rlfleet.common.weights import checksum_of
from rlfleet.common.weightsync_client import WeightSyncClient

JOB = "job-spool"


def _payload(seed: int, n: int = 3 << 20) -> bytes:
    return (bytes([seed]) * 97 + bytes(range(256))) * (n // 353)


def _start(service_factory, spool: Path):
    # keep_versions is left at its default (2).
    args = ["--spool-dir", str(spool), "--evict-wait-s", "30", "--memory-overhead-mb", "256"]
    return service_factory("weightsync", "rlfleet.weightsync", args)


def _files(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.rglob("*") if p.is_file())


def _mapped(pid: int, spool: Path) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [line for line in maps if str(spool) in line]


@pytest.mark.slow
def test_spooled_versions_are_mapped_bounded_and_survive_kill_9(service_factory, tmp_path):
    spool = tmp_path / "spool"
    proc = _start(service_factory, spool)
    payloads = [_payload(seed) for seed in range(3)]
    with WeightSyncClient(proc.address, timeout_s=30) as client:
        for version, payload in enumerate(payloads, start=1):
            client.push(job_id=JOB, version=version, payload=payload, checksum=checksum_of(payload))
            got = client.pull(job_id=JOB, version=0, replica_id="r0")
            assert (got.version, bytes(got.payload)) == (version, payload)
            client.release(got)
            assert len(_files(spool)) <= 2
        # Served from shared mappings of its spool files, one per held version.
        mapped = _mapped(proc.pid, spool)
        assert mapped and all(line.split()[1].endswith("s") for line in mapped)
    proc.kill()  # at once: the last version's fsync may not have run

    proc = _start(service_factory, spool)
    with WeightSyncClient(proc.address, timeout_s=30) as client:
        got = client.pull(job_id=JOB, version=0)
        assert (got.version, bytes(got.payload)) == (3, payloads[2])
        assert bytes(client.pull(job_id=JOB, version=2).payload) == payloads[1]
    files = _files(spool)
    assert len(files) == 2 and all(name.endswith(".safetensors") for name in files)
