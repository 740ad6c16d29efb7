"""Weight-sync's resident memory across versions (issue #16: "With a 1 GB model and
keep_versions = 2, weight-sync's resident memory stays under about 2.5 GB across 10
versions").

All real: a weight-sync process (``python -m rlfleet.weightsync``, started the way the
tests and ``rlfleet up`` start services, ``rlfleet.common.procs.start_service``) with a
spool directory and ``--keep-versions 2``; this process pushes ``--versions`` versions of a
``--size-gb`` payload through ``WeightSyncClient`` (the trainer's client: the data plane),
and a puller (a second ``WeightSyncClient``, as a rollout replica uses it) pulls each
version, verifies its checksum and releases it. By default the puller pulls version v
while version v + 1 is pushed (overlapped, the harder case: a version being pulled is
never evicted); ``--sequential`` pulls after each push instead.

A sampler reads weight-sync's ``/proc/PID/status`` every 20 ms: VmRSS (resident), and
separately RssAnon (anonymous memory: the process's own) and RssFile (pages of mapped
files: the spool's versions, page cache the kernel can reclaim); VmHWM is the kernel's
own peak of VmRSS. After each version the figures at that moment and the peaks since the
previous version are recorded. ``--no-spool`` runs weight-sync without a spool
(versions in anonymous memory) for comparison.

    .venv/bin/python bench/weightsync_memory.py [--size-gb 1.0] [--versions 10] [--json PATH]
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

import _common

GB = 1e9
TARGET_BYTES = 2.5e9  # the figure, for 1 GB versions and keep_versions 2
FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def status(pid: int) -> dict[str, int]:
    """Memory fields of /proc/PID/status, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in FIELDS:
            out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Peaks of weight-sync's memory fields, sampled every ``period_s``."""

    def __init__(self, pid: int, period_s: float = 0.02):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.period_s = pid, period_s
        self.lock = threading.Lock()
        self.peak: dict[str, int] = {}
        self.window: dict[str, int] = {}  # peaks since the last ``take_window``
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                now = status(self.pid)
            except OSError:
                return
            with self.lock:
                for key, value in now.items():
                    self.peak[key] = max(self.peak.get(key, 0), value)
                    self.window[key] = max(self.window.get(key, 0), value)
            self.stop.wait(self.period_s)

    def take_window(self) -> dict[str, int]:
        with self.lock:
            window, self.window = self.window, {}
        return window


def make_payload(num_bytes: int) -> bytearray:
    block = os.urandom(16 << 20)
    payload = bytearray(num_bytes)
    view = memoryview(payload)
    for offset in range(0, num_bytes, len(block)):
        n = min(len(block), num_bytes - offset)
        view[offset : offset + n] = block[:n]
    return payload


def scrape(port: int) -> dict[str, float]:
    """Weight-sync's own push and fsync timings from its /metrics (sums and counts)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in {
            "rlfleet_weightsync_push_seconds_sum",
            "rlfleet_weightsync_push_seconds_count",
            "rlfleet_weightsync_fsync_seconds_sum",
            "rlfleet_weightsync_fsync_seconds_count",
        }:
            out[name.removeprefix("rlfleet_weightsync_")] = float(value)
    return out


def spool_bytes(root: Path | None) -> tuple[int, int]:
    """(files, bytes) in the spool."""
    if root is None or not root.exists():
        return 0, 0
    files = [p for p in root.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def run(args, tmp: Path) -> dict:
    from rlfleet.common.procs import start_service
    from rlfleet.common.weights import checksum_of
    from rlfleet.common.weightsync_client import WeightSyncClient

    size = int(args.size_gb * GB)
    spool = None if args.no_spool else tmp / "spool"
    flags = ["--log-format", "json", "--keep-versions", str(args.keep_versions)]
    if spool is not None:
        flags += ["--spool-dir", str(spool)]
    print(f"building a {size / GB:.2f} GB payload ...", flush=True)
    payload = make_payload(size)
    ws = start_service("weightsync", "rlfleet.weightsync", flags, run_dir=tmp / "run",
                       env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    sampler = Sampler(ws.pid)
    trainer = WeightSyncClient(ws.address, timeout_s=600)
    replica = WeightSyncClient(ws.address, timeout_s=600)
    rows: list[dict] = []
    pulled: dict[int, float] = {}
    try:
        assert trainer.data_plane() is not None, "weight-sync offers no data plane"
        replica.data_plane()
        idle = status(ws.pid)
        sampler.start()
        job = "bench-memory"

        def pull(version: int) -> None:
            start = time.perf_counter()
            got = replica.pull(job_id=job, version=version, replica_id="replica-0")
            assert got.version == version and len(got.payload) == size
            replica.release(got)
            pulled[version] = time.perf_counter() - start

        puller: threading.Thread | None = None
        for version in range(1, args.versions + 1):
            payload[:8] = version.to_bytes(8, "little")  # a new version, a new checksum
            checksum = checksum_of(payload)
            start = time.perf_counter()
            trainer.push(job_id=job, version=version, payload=payload, checksum=checksum)
            push_s = time.perf_counter() - start
            if args.sequential:
                pull(version)
            else:
                if puller is not None:
                    puller.join()
                puller = threading.Thread(target=pull, args=(version,))
                puller.start()
                if version == args.versions:
                    puller.join()
            now = status(ws.pid)
            window = sampler.take_window()
            files, on_disk = spool_bytes(spool)
            row = {
                "version": version,
                "push_s": round(push_s, 3),
                "rss_bytes": now["VmRSS"],
                "rss_anon_bytes": now["RssAnon"],
                "rss_file_bytes": now["RssFile"],
                "peak_rss_bytes": max(window.get("VmRSS", 0), now["VmRSS"]),
                "peak_rss_anon_bytes": max(window.get("RssAnon", 0), now["RssAnon"]),
                "peak_rss_file_bytes": max(window.get("RssFile", 0), now["RssFile"]),
                "spool_files": files,
                "spool_bytes": on_disk,
            }
            rows.append(row)
            print(
                f"  v{version:>2}: push {push_s:5.2f}s  RSS {now['VmRSS'] / GB:.2f} GB "
                f"(anon {now['RssAnon'] / GB:.2f}, file {now['RssFile'] / GB:.2f}); "
                f"peak since last {row['peak_rss_bytes'] / GB:.2f} GB "
                f"(anon {row['peak_rss_anon_bytes'] / GB:.2f}, "
                f"file {row['peak_rss_file_bytes'] / GB:.2f}); spool {files} files",
                flush=True,
            )
        time.sleep(0.1)
        final = status(ws.pid)
        for row in rows:
            row["pull_s"] = round(pulled[row["version"]], 3)
        if spool is not None:
            ws_store_seconds = {}
            for _ in range(100):  # the last version's fsync runs in the background
                ws_store_seconds = scrape(ws.info["metrics_port"])
                if ws_store_seconds.get("fsync_seconds_count", 0) >= args.versions:
                    break
                time.sleep(0.1)
        else:
            ws_store_seconds = scrape(ws.info["metrics_port"])
    finally:
        sampler.stop.set()
        trainer.close()
        replica.close()
        ws.stop()
    peak = {k: max(sampler.peak.get(k, 0), *(r[f"peak_{n}_bytes"] for r in rows))
            for k, n in (("VmRSS", "rss"), ("RssAnon", "rss_anon"), ("RssFile", "rss_file"))}  # fmt: skip
    vm_hwm = final.get("VmHWM", 0)
    return {
        "size_bytes": size,
        "versions": args.versions,
        "keep_versions": args.keep_versions,
        "spool": spool is not None,
        "overlapped_pulls": not args.sequential,
        "peak_rss_bytes": peak["VmRSS"],
        "peak_rss_anon_bytes": peak["RssAnon"],
        "peak_rss_file_bytes": peak["RssFile"],
        "vm_hwm_bytes": vm_hwm,
        "idle_rss_bytes": idle["VmRSS"],
        "idle_rss_anon_bytes": idle["RssAnon"],
        "max_spool_files": max(r["spool_files"] for r in rows),
        "push_s_median": sorted(r["push_s"] for r in rows)[len(rows) // 2],
        "pull_s_median": sorted(r["pull_s"] for r in rows)[len(rows) // 2],
        # Inside weight-sync: from a push's first byte to its version being current, and
        # (with a spool) the background fsync of each version, which the reply does not wait for.
        "ws_push_s_mean": _mean(ws_store_seconds, "push_seconds"),
        "ws_fsync_s_mean": _mean(ws_store_seconds, "fsync_seconds"),
        "per_version": rows,
    }


def _mean(metrics: dict[str, float], name: str) -> float | None:
    count = metrics.get(f"{name}_count", 0)
    return round(metrics[f"{name}_sum"] / count, 3) if count else None


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--size-gb", type=float, default=1.0, help="payload size (decimal GB)")
    p.add_argument("--versions", type=int, default=10)
    p.add_argument("--keep-versions", type=int, default=2)
    p.add_argument(
        "--sequential", action="store_true", help="pull after each push, not beside the next"
    )
    p.add_argument("--no-spool", action="store_true", help="versions in anonymous memory")
    p.add_argument("--tmp-dir", default=None, help="where the spool goes (default: the system's)")
    args = p.parse_args(argv)
    if args.quick:
        args.size_gb, args.versions = min(args.size_gb, 0.25), min(args.versions, 4)
    started = time.monotonic()
    print(f"weight-sync memory bench ({_common.load_note()})")
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-wsmem-", dir=args.tmp_dir) as tmp:
        result = run(args, Path(tmp))
    # The target scales with the size and keep_versions: the 2.5 GB is for 1 GB × 2.
    target = TARGET_BYTES * args.size_gb * args.keep_versions / 2.0
    worst = max(result["peak_rss_bytes"], result["vm_hwm_bytes"])
    under = worst < target
    print(
        f"peak RSS {result['peak_rss_bytes'] / GB:.2f} GB (VmHWM {result['vm_hwm_bytes'] / GB:.2f} GB), "
        f"of it anonymous {result['peak_rss_anon_bytes'] / GB:.2f} GB (peak RssAnon), "
        f"mapped files {result['peak_rss_file_bytes'] / GB:.2f} GB (peak RssFile); "
        f"at most {result['max_spool_files']} spool files; weight-sync's push "
        f"{result['ws_push_s_mean']} s, background fsync {result['ws_fsync_s_mean']} s a version (mean); "
        f"{'under' if under else 'NOT under'} the {target / GB:.2f} GB target"
    )
    report = _common.report(
        "weightsync_memory",
        quick=args.quick,
        started=started,
        target_bytes=target,
        under_target=under,
        **result,
        load=_common.load(),
    )
    _common.write_json(args.json, report)
    return 0 if under else 1


if __name__ == "__main__":
    raise SystemExit(main())
