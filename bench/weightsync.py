"""Weight sync: a policy version from the trainer to K rollout replicas, against raw loopback TCP.

rlfleet's path, all real: the trainer side encodes a state dict of N parameters
(``weights.encode_state_dict``, safetensors; the trainer's own encoder, which
writes into the buffer of its previous version, is timed beside it as
``encode_into_s``), takes its checksum and pushes it
to a weight-sync process (``python -m rlfleet.weightsync``, versions in memory,
no spool); then K puller processes, started beforehand and released together,
each pull it, verify its checksum and call ``ReportHeld``, as a rollout replica
does before it swaps weights in (they load no model). Both sides use
``WeightSyncClient``, the class the trainer and the replicas use, two ways:

- ``data_plane`` (what the services do): raw bytes over weight-sync's TCP data
  plane, found through ``GetDataPlane`` (``rlfleet.common.weight_transport``);
- ``grpc``: PushVersion / PullVersion streams of serialised chunks, what a
  client without the data plane gets (TLS on, or ``--data-port -1``).

The headline figures use ``data_plane``; ``grpc`` is measured at K=1 beside it.

The third path, the weight group (``weights.transport = "collective"``,
``common/weight_group.py``), in the same run at K = 1, 2, 4: the trainer side
broadcasts the payload in 512 MB buckets, then its checksum, over a gloo process
group to K receiver processes, each receiving into a buffer allocated beforehand and
verifying the checksum; timed from the first byte until the last receiver holds the
version. ``--json`` adds ``{"collective": {"s_k1", "s_k4", "frac_of_loopback_k1",
"vs_tcp_path_k4"}}`` at the largest size run with K = 4; frac_of_loopback_k1 there is
raw TCP's seconds for one receiver over the group's (one hop each).
``--group-backend nccl`` (a machine with K + 1 GPUs) runs the group over NCCL instead:
the trainer side on cuda:0 and receiver k on cuda:k, each staging the bytes through a
bucket on its GPU (host payload in, host payload out, checksum verified as on gloo);
the K a machine has too few GPUs for are skipped and say so.
Push time includes the checksum (xxh3-128) the trainer computes for each push.

The baseline, in the same run and on the same payload size: one sender process
writes the payload from memory with ``socket.sendall`` to K receiver processes
that ``recv_into`` buffers allocated beforehand — plain loopback TCP, no
framing, no checksum, no copies beyond the kernel's.

Definitions (printed with the figures):
- push GB/s = bytes / PushVersion seconds; pull GB/s (K=1) = bytes / seconds
  from the start of PullVersion until the replica has verified the payload and
  reported it held.
- frac_of_loopback_k1 = per-hop rate of rlfleet / raw TCP rate, where the
  per-hop rate is 2 × bytes / (push s + pull s): the version crosses loopback
  twice (trainer → weight-sync → replica), so this is the harmonic mean of the
  two hops, each compared with one raw hop.
- fanout_vs_raw_k8 (the fan-out target, >= 0.8) = raw TCP's time to deliver
  the payload to 8 receivers / rlfleet's T(8), T(K) the time from releasing the
  K pullers until the last one holds the version (verified, reported): how close
  serving eight replicas comes to the machine's own ceiling for moving those
  bytes eight times, whatever that ceiling is on this machine's cores.
- fanout_efficiency_kK = T(1) / T(K) (informational): 1.0 means K replicas are
  served as fast as one, 1/K one after another; raw_fanout_efficiency_kK is the
  same for raw TCP. Their quotient is no target: a slow single pull would raise
  it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common

HERE = Path(__file__).resolve()
GB = 1e9
# Near-linear fan-out: rlfleet serves 8 replicas in no more than 1/0.8 of the time raw TCP
# takes to send the same payload to 8 receivers on this machine.
FANOUT_TARGET = 0.8


# --------------------------------------------------------------------------- child processes
def puller_main(
    address: str, job_id: str, version: int, replica: str, max_mb: int, style: str, size: int
) -> None:
    """A lightweight replica: waits for "go" on stdin, pulls, verifies, reports held."""
    from rlfleet.common.weight_transport import alloc_buffer
    from rlfleet.common.weightsync_client import WeightSyncClient

    client = WeightSyncClient(
        address, timeout_s=600, max_message_mb=max_mb, use_data_plane=style == "data_plane"
    )
    client.data_plane()  # connected, and the data plane looked up, before the clock starts
    # A replica receives each version into the buffer of the one before (client.release);
    # this one-shot puller is given that buffer up front, as raw TCP's receivers are theirs.
    client.buffers.give(alloc_buffer(size))
    print("ready", flush=True)
    sys.stdin.readline()
    start, cpu = time.time(), time.process_time()
    got = client.pull(job_id=job_id, version=version, replica_id=replica)
    client.report_held(replica_id=replica, job_id=job_id, version=got.version, address="")
    end, cpu = time.time(), time.process_time() - cpu
    print(
        json.dumps({"start": start, "end": end, "cpu": cpu, "bytes": len(got.payload)}), flush=True
    )


def tcp_receiver_main(port: int, nbytes: int) -> None:
    buf = bytearray(nbytes)  # allocated (and zero-filled) before the clock starts
    view = memoryview(buf)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"r")
    cpu = time.process_time()
    got = 0
    while got < nbytes:
        n = sock.recv_into(view[got:], min(nbytes - got, 1 << 24))
        if n == 0:
            raise SystemExit("sender closed early")
        got += n
    sock.sendall(b"d")
    sock.close()
    print(json.dumps({"cpu": time.process_time() - cpu}), flush=True)


def group_receiver_main(port: int, world: int, generation: int, rank: int, nbytes: int,
                        backend: str) -> None:  # fmt: skip
    """A replica's end of the weight group: joins, receives one version, verifies it."""
    from rlfleet.common.weight_group import GroupAddress, WeightReceiver

    buf = bytearray(nbytes)  # allocated before the clock starts, as raw TCP's receivers are
    address = GroupAddress("127.0.0.1", port, world, generation, backend)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    receiver = WeightReceiver(address, rank, job_id="bench", alloc=lambda n: buf,
                              release=lambda b: None, device=device)  # fmt: skip
    cpu = time.process_time()
    while (got := receiver.take("bench", 1)) is None:
        if receiver.broken:
            raise SystemExit(f"weight group broke: {receiver.broken}")
        time.sleep(0.0005)
    print(json.dumps({"end": time.time(), "cpu": time.process_time() - cpu,
                      "bytes": len(got.payload)}), flush=True)  # fmt: skip
    os._exit(0)  # the group's receive thread blocks in gloo: leave without unwinding it


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(HERE), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


# --------------------------------------------------------------------------- raw TCP
def raw_tcp(payload: bytes, k: int) -> tuple[float, float]:
    """(seconds from the first byte sent until all K receivers have every byte,
    CPU seconds the sender and the receivers used)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(k)
    port = server.getsockname()[1]
    procs = [_spawn(["--tcp-receiver", str(port), str(len(payload))]) for _ in range(k)]
    try:
        conns = []
        for _ in range(k):
            conn, _addr = server.accept()
            conn.recv(1)  # the receiver's buffer is allocated
            conns.append(conn)
        view = memoryview(payload)
        start, cpu = time.perf_counter(), time.process_time()
        threads = [threading.Thread(target=c.sendall, args=(view,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for c in conns:
            c.recv(1)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        for c in conns:
            c.close()
        for p in procs:
            cpu += json.loads(p.stdout.readline())["cpu"]
    finally:
        server.close()
        for p in procs:
            p.wait(60)
    return seconds, cpu


# --------------------------------------------------------------------------- weight group
def collective(payload: bytearray, k: int, *, backend: str = "gloo",
               bucket_bytes: int = 512 << 20) -> tuple[float, float]:  # fmt: skip
    """(seconds from the trainer's first byte until all K replicas hold the version, verified;
    CPU seconds of all members), over the weight group: the trainer broadcasts the payload in
    buckets, then its checksum (what ``trainer/job.py`` does while it gathers)."""
    from rlfleet.common.procs import free_port
    from rlfleet.common.weight_group import GroupAddress, WeightSender
    from rlfleet.common.weights import checksum_of

    address = GroupAddress("127.0.0.1", free_port(), k + 1, time.time_ns(), backend)
    sender = WeightSender(address, timeout_s=600,
                          device="cuda:0" if backend == "nccl" else "cpu")  # fmt: skip
    procs = [_spawn(["--group-receiver", str(address.port), str(k + 1), str(address.generation),
                     str(rank), str(len(payload)), backend])
             for rank in range(1, k + 1)]  # fmt: skip
    try:
        if not sender.usable:
            raise RuntimeError(f"weight group did not form: {sender.broken}")
        start_wall, cpu = time.time(), time.process_time()
        ok = sender.begin(1, len(payload))
        for begin in range(0, len(payload), bucket_bytes):
            ok = ok and sender.send(payload, begin, min(len(payload), begin + bucket_bytes))
        ok = ok and sender.end(checksum_of(payload))
        if not ok:
            raise RuntimeError(f"broadcast failed: {sender.broken}")
        done = [json.loads(p.stdout.readline()) for p in procs]
        assert all(d["bytes"] == len(payload) for d in done)
        seconds = max(d["end"] for d in done) - start_wall
        cpu = time.process_time() - cpu + sum(d["cpu"] for d in done)
    finally:
        sender.close()
        for p in procs:
            p.kill()
            p.wait(60)
    return seconds, cpu


# --------------------------------------------------------------------------- rlfleet
def make_state(params: int, dtype: str):
    import torch

    tdtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    state, left, i = {}, params, 0
    while left > 0:
        n = min(left, 16 * 1024 * 1024)  # ~a 4096 x 4096 matrix per tensor
        state[f"model.layers.{i}.weight"] = torch.empty(n, dtype=tdtype).uniform_(-0.05, 0.05)
        left -= n
        i += 1
    return state


def pull_round(
    address: str, job_id: str, version: int, k: int, max_mb: int, style: str, size: int
) -> list[dict]:
    procs = [
        _spawn(
            ["--puller", address, job_id, str(version), f"bench-{i}", str(max_mb), style, str(size)]
        )
        for i in range(k)
    ]
    try:
        for p in procs:
            line = p.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a puller did not start: {line!r}")
        for p in procs:  # release them together
            p.stdin.write("go\n")
            p.stdin.flush()
        results = []
        for p in procs:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError("a puller died (out of memory?)")
            results.append(json.loads(line))
    finally:
        for p in procs:
            p.wait(60)
    return results


def run_size(
    params: int,
    dtype: str,
    ks: list[int],
    *,
    repeats: int,
    tmp: Path,
    max_mb: int,
    style: str,
    group_backend: str = "gloo",
) -> dict:
    from rlfleet.common.procs import start_service
    from rlfleet.common.weight_transport import BufferPool
    from rlfleet.common.weights import checksum_of, encode_state_dict, encode_state_dict_into
    from rlfleet.common.weightsync_client import WeightSyncClient

    other = "grpc" if style == "data_plane" else "data_plane"
    state = make_state(params, dtype)
    start = time.perf_counter()
    payload = encode_state_dict(state)
    encode_s = time.perf_counter() - start
    # The trainer's encoder writes into the payload buffer of its previous version.
    pool = BufferPool()
    pool.give(encode_state_dict_into(state, pool.take))
    start = time.perf_counter()
    encode_state_dict_into(state, pool.take)
    encode_into_s = time.perf_counter() - start
    del state, pool
    start = time.perf_counter()
    checksum_of(payload)
    checksum_s = time.perf_counter() - start
    size = len(payload)

    raw, raw_cpu = {}, {}
    for k in ks:
        raw[k], raw_cpu[k] = min(raw_tcp(payload, k) for _ in range(repeats))
    # The collective path (weights.transport = collective) at K = 1, 2, 4.
    group, group_cpu = {}, {}
    writable = bytearray(payload)
    for k in [k for k in ks if k <= 4]:
        if group_backend == "nccl" and k + 1 > gpu_count():
            print(f"  nccl group at K = {k}: skipped, needs {k + 1} GPUs ({gpu_count()} here)")
            continue
        group[k], group_cpu[k] = min(collective(writable, k, backend=group_backend)
                                     for _ in range(repeats))  # fmt: skip
    del writable

    run_dir = tmp / f"ws-{params}-{dtype}"
    ws = start_service(
        "weightsync",
        "rlfleet.weightsync",
        ["--log-format", "json", "--keep-versions", "2", "--max-message-mb", str(max_mb)],
        run_dir=run_dir,
        env={"OMP_NUM_THREADS": "1"},
    )
    try:
        job = f"bench-{params}-{dtype}"
        clients = {
            how: WeightSyncClient(
                ws.address, timeout_s=600, max_message_mb=max_mb, use_data_plane=how == "data_plane"
            )
            for how in (style, other)
        }
        for client in clients.values():
            client.data_plane()  # connected and looked up before the clock starts

        # The trainer's pushes (encoding done above, checksum timed). Weight-sync keeps 2
        # versions and receives a data-plane push into the buffer of a version it dropped:
        # versions 1-3 warm it up (1 is the cold figure, fresh memory), 4 is the steady
        # state a trainer pushing every step sees; 5 goes the other way.
        push_s, push_cpu = {}, {}
        for version, how in ((1, "cold"), (2, None), (3, None), (4, style), (5, other)):
            client = clients[other if how == other else style]
            start, cpu, ws_cpu = (
                time.perf_counter(),
                time.process_time(),
                _common.proc_cpu_seconds(ws.pid),
            )
            client.push(job_id=job, version=version, payload=payload, checksum=checksum_of(payload))
            if how:
                push_s[how] = time.perf_counter() - start
                push_cpu[how] = (
                    time.process_time() - cpu + _common.proc_cpu_seconds(ws.pid) - ws_cpu
                )
        del payload  # the trainer is done with it; keep the machine's memory for the pullers
        for client in clients.values():
            client.close()

        def best_round(version: int, k: int, how: str, n: int) -> dict:
            best = None
            for _ in range(n):
                ws_cpu = _common.proc_cpu_seconds(ws.pid)
                res = pull_round(ws.address, job, version, k, max_mb, how, size)
                cpu = _common.proc_cpu_seconds(ws.pid) - ws_cpu + sum(r["cpu"] for r in res)
                assert all(r["bytes"] == size for r in res)
                t_all = max(r["end"] for r in res) - min(r["start"] for r in res)
                if best is None or t_all < best["t_all_s"]:
                    best = {
                        "t_all_s": t_all,
                        "per_replica_s": [r["end"] - r["start"] for r in res],
                        "cpu_s": cpu,
                    }
            return best

        pulls = {k: best_round(4, k, style, repeats) for k in ks}
        other_k1 = best_round(5, 1, other, repeats)
    finally:
        ws.stop()

    pull1 = pulls[1]["t_all_s"]
    raw_rate = size / raw[1]
    gbs = size / GB
    # CPU seconds per GB and hop: robust to a busy machine, unlike wall time.
    cpu_raw = raw_cpu[1] / gbs
    cpu_push, cpu_pull = push_cpu[style] / gbs, pulls[1]["cpu_s"] / gbs
    return {
        "params": params,
        "dtype": dtype,
        "bytes": size,
        "client_style": style,
        "encode_s": encode_s,
        "encode_into_s": encode_into_s,
        "checksum_s": checksum_s,
        "push_s": push_s[style],
        "push_cold_s": push_s["cold"],
        "push_gb_per_s": size / push_s[style] / GB,
        "ks": ks,
        "raw_tcp_s": {str(k): v for k, v in raw.items()},
        "raw_tcp_gb_per_s_k1": raw_rate / GB,
        "pull_all_s": {str(k): v["t_all_s"] for k, v in pulls.items()},
        "pull_per_replica_s": {str(k): v["per_replica_s"] for k, v in pulls.items()},
        "time_to_all_hold_s": {str(k): push_s[style] + v["t_all_s"] for k, v in pulls.items()},
        "pull_gb_per_s_k1": size / pull1 / GB,
        "per_hop_gb_per_s_k1": 2 * size / (push_s[style] + pull1) / GB,
        "frac_of_loopback_k1": 2 * size / (push_s[style] + pull1) / raw_rate,
        "fanout_efficiency": {str(k): pull1 / pulls[k]["t_all_s"] for k in ks},
        # The fan-out target: raw TCP's time for K receivers over ours, same payload.
        "fanout_vs_raw": {str(k): raw[k] / pulls[k]["t_all_s"] for k in ks},
        "cpu_s_per_gb": {
            "raw_tcp_hop": cpu_raw,
            "push_hop": cpu_push,
            "pull_hop_k1": cpu_pull,
            "pull_k8_all": pulls[8]["cpu_s"] / gbs if 8 in pulls else None,
        },
        "cpu_frac_of_loopback_k1": 2 * cpu_raw / (cpu_push + cpu_pull),
        # 1.0: each of 8 replicas costs the machine as much CPU as a single one did.
        "cpu_fanout_linearity_k8": cpu_pull / (pulls[8]["cpu_s"] / gbs / 8) if 8 in pulls else None,
        "raw_fanout_efficiency": {str(k): raw[1] / raw[k] for k in ks},
        # The weight group: trainer → K replicas in one broadcast, no weight-sync hop.
        "collective_s": {str(k): v for k, v in group.items()},
        "collective_cpu_s": {str(k): v for k, v in group_cpu.items()},
        "collective_frac_of_loopback": {str(k): raw[k] / v for k, v in group.items()},
        "collective_vs_tcp_path": {
            str(k): (push_s[style] + pulls[k]["t_all_s"]) / v for k, v in group.items()
        },
        "other_style": {
            "client_style": other,
            "push_s": push_s[other],
            "pull_s_k1": other_k1["t_all_s"],
            "frac_of_loopback_k1": 2 * size / (push_s[other] + other_k1["t_all_s"]) / raw_rate,
            "cpu_frac_of_loopback_k1": 2
            * cpu_raw
            / (push_cpu[other] / gbs + other_k1["cpu_s"] / gbs),
        },
        "load": _common.load(),
    }


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.distributed.is_nccl_available() else 0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def fits(params: int, dtype: str, k: int) -> bool:
    """Peak memory: the trainer side encodes (state + payload + a transient copy), then
    weight-sync holds two versions and two spare buffers while the trainer's payload
    lives, and each puller holds one buffer; keep 4 GB spare."""
    size = params * (4 if dtype == "fp32" else 2)
    peak = max(3 * size, 5 * size + size * k)
    return peak + 4e9 < mem_available()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--puller"]:
        puller_main(argv[1], argv[2], int(argv[3]), argv[4], int(argv[5]), argv[6], int(argv[7]))
        return 0
    if argv[:1] == ["--tcp-receiver"]:
        tcp_receiver_main(int(argv[1]), int(argv[2]))
        return 0
    if argv[:1] == ["--group-receiver"]:
        group_receiver_main(*(int(a) for a in argv[1:6]), argv[6])
        return 0
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=0, help="K=1 runs per size (best is kept)")
    p.add_argument("--max-params", type=float, default=0, help="skip sizes above this")
    p.add_argument(
        "--group-backend",
        choices=["gloo", "nccl"],
        default="gloo",
        help="the weight group's backend (nccl: trainer on cuda:0, replica k on cuda:k)",
    )
    args = p.parse_args(argv)
    started = time.monotonic()
    if args.quick:
        plan = [(10_000_000, "fp32", [1, 2, 4, 8]), (50_000_000, "fp32", [1, 2, 4, 8])]
    else:
        plan = [
            (10_000_000, "fp32", [1, 2, 4, 8]),
            (10_000_000, "bf16", [1, 2, 4, 8]),
            (100_000_000, "fp32", [1, 2, 4, 8]),
            (100_000_000, "bf16", [1, 2, 4, 8]),
            (1_000_000_000, "bf16", [1, 2]),
            (1_000_000_000, "fp32", [1]),
        ]
    repeats = args.repeats or 2
    max_mb = 64
    style = "data_plane"
    print(f"weight-sync bench ({_common.load_note()}); headline: {style!r}, beside it 'grpc'")
    results, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="rlfleet-bench-ws-") as tmp:
        for params, dtype, ks in plan:
            if args.max_params and params > args.max_params:
                continue
            ks = [k for k in ks if fits(params, dtype, k)]
            if not ks or ks[0] != 1:
                skipped.append(f"{params / 1e6:.0f}M {dtype}: not enough free memory")
                print(f"skipping {params / 1e6:.0f}M {dtype}: not enough free memory")
                continue
            r = run_size(
                params,
                dtype,
                ks,
                repeats=repeats,
                tmp=Path(tmp),
                max_mb=max_mb,
                style=style,
                group_backend=args.group_backend,
            )
            results.append(r)
            print(
                f"  {params / 1e6:>6.0f}M {dtype}: {r['bytes'] / GB:.2f} GB, encode {r['encode_s']:.2f}s "
                f"(trainer's, steady: {r['encode_into_s']:.3f}s), "
                f"push {r['push_gb_per_s']:.2f} GB/s, pull {r['pull_gb_per_s_k1']:.2f} GB/s, "
                f"raw TCP {r['raw_tcp_gb_per_s_k1']:.2f} GB/s; frac {r['frac_of_loopback_k1']:.3f} "
                f"({r['other_style']['client_style']} clients: "
                f"{r['other_style']['frac_of_loopback_k1']:.3f}); CPU-s/GB raw hop "
                f"{r['cpu_s_per_gb']['raw_tcp_hop']:.2f}, push {r['cpu_s_per_gb']['push_hop']:.2f}, "
                f"pull {r['cpu_s_per_gb']['pull_hop_k1']:.2f} "
                f"(load {r['load']['loadavg_1m']:.2f})",
                flush=True,
            )

    rows = []
    for r in results:
        for k in r["ks"]:
            rows.append(
                [
                    f"{r['params'] / 1e6:.0f}M",
                    r["dtype"],
                    k,
                    r["bytes"] / GB,
                    r["raw_tcp_s"][str(k)],
                    r["push_s"],
                    r["pull_all_s"][str(k)],
                    r["time_to_all_hold_s"][str(k)],
                    k * r["bytes"] / r["raw_tcp_s"][str(k)] / GB,
                    k * r["bytes"] / r["pull_all_s"][str(k)] / GB,
                    r["raw_fanout_efficiency"][str(k)],
                    r["fanout_efficiency"][str(k)],
                    r["fanout_vs_raw"][str(k)],
                    r["load"]["loadavg_1m"],
                ]
            )
    print(
        _common.table(
            [
                "params",
                "dtype",
                "K",
                "GB",
                "raw s",
                "push s",
                "pull s",
                "all hold s",
                "raw agg GB/s",
                "pull agg GB/s",
                "raw fanout",
                "ours fanout",
                "raw s/pull s",
                "load",
            ],
            rows,
        )
    )
    group_rows = [
        [f"{r['params'] / 1e6:.0f}M", r["dtype"], k, r["bytes"] / GB, r["raw_tcp_s"][k],
         r["time_to_all_hold_s"][k], r["collective_s"][k], r["collective_frac_of_loopback"][k],
         r["collective_vs_tcp_path"][k]]
        for r in results for k in r["collective_s"]
    ]  # fmt: skip
    print(f"time from the trainer's first byte until all K replicas hold the version "
          f"(weight group over {args.group_backend}):")  # fmt: skip
    print(_common.table(["params", "dtype", "K", "GB", "raw TCP s", "TCP path s",
                         "collective s", "raw/coll", "tcp/coll"], group_rows))  # fmt: skip
    with_k4 = [r for r in results if "4" in r["collective_s"]]
    g_head = max(with_k4, key=lambda r: r["bytes"]) if with_k4 else None
    collective_summary = None
    if g_head:
        collective_summary = {
            "params": g_head["params"], "dtype": g_head["dtype"], "backend": args.group_backend,
            "s_k1": round(g_head["collective_s"]["1"], 4),
            "s_k4": round(g_head["collective_s"]["4"], 4),
            "frac_of_loopback_k1": round(g_head["collective_frac_of_loopback"]["1"], 4),
            "vs_tcp_path_k4": round(g_head["collective_vs_tcp_path"]["4"], 4),
        }  # fmt: skip
        print(
            f"collective at {g_head['params'] / 1e6:.0f}M {g_head['dtype']}: K=1 "
            f"{collective_summary['s_k1']:.3f}s ({collective_summary['frac_of_loopback_k1']:.3f} "
            f"of raw loopback TCP's time ratio), K=4 {collective_summary['s_k4']:.3f}s, "
            f"{collective_summary['vs_tcp_path_k4']:.2f}x faster than the TCP path at K=4"
        )
    # Headline figures: the largest size that ran with K = 1 and K = 8.
    full = [r for r in results if 8 in r["ks"]]
    head = max(full, key=lambda r: r["bytes"]) if full else None
    frac_k1 = head["frac_of_loopback_k1"] if head else None
    eff_k8 = head["fanout_efficiency"]["8"] if head else None
    raw_eff_k8 = head["raw_fanout_efficiency"]["8"] if head else None
    vs_raw_k8 = head["fanout_vs_raw"]["8"] if head else None
    if head:
        print(
            f"at {head['params'] / 1e6:.0f}M {head['dtype']} ({head['bytes'] / GB:.2f} GB):\n"
            f"  frac_of_loopback_k1 = (2 x bytes / (push s + pull s)) / raw TCP rate = {frac_k1:.3f} "
            f"with {style!r} clients (target >= 0.6); "
            f"{head['other_style']['frac_of_loopback_k1']:.3f} with "
            f"{head['other_style']['client_style']!r} clients\n"
            f"  by CPU time instead of wall time (robust to a busy machine): "
            f"{head['cpu_frac_of_loopback_k1']:.3f} with {style!r} clients, "
            f"{head['other_style']['cpu_frac_of_loopback_k1']:.3f} with "
            f"{head['other_style']['client_style']!r} clients\n"
            f"  fanout_vs_raw_k8 = raw TCP s to 8 receivers / T_all(K=8) = {vs_raw_k8:.3f} "
            f"({head['raw_tcp_s']['8']:.3f}s / {head['pull_all_s']['8']:.3f}s; target >= "
            f"{FANOUT_TARGET}: {'met' if vs_raw_k8 >= FANOUT_TARGET else 'MISSED'})\n"
            f"  fanout_efficiency_k8 = T_all(K=1) / T_all(K=8) = {eff_k8:.3f} "
            f"(raw TCP on this machine: {raw_eff_k8:.3f}; 1.0 = eight served as fast as one; "
            "informational)\n"
            f"  CPU per replica at K=8 against K=1 (1.0 = every replica costs the same): "
            f"{head['cpu_fanout_linearity_k8']:.3f}"
        )
    payload = _common.report(
        "weightsync",
        quick=args.quick,
        started=started,
        frac_of_loopback_k1=round(frac_k1, 4) if frac_k1 is not None else None,
        fanout_vs_raw_k8=round(vs_raw_k8, 4) if vs_raw_k8 is not None else None,
        fanout_efficiency_k8=round(eff_k8, 4) if eff_k8 is not None else None,
        raw_fanout_efficiency_k8=round(raw_eff_k8, 4) if raw_eff_k8 is not None else None,
        headline_size={"params": head["params"], "dtype": head["dtype"]} if head else None,
        client_style=style,
        collective=collective_summary,
        cpu_frac_of_loopback_k1=round(head["cpu_frac_of_loopback_k1"], 4) if head else None,
        cpu_fanout_linearity_k8=round(head["cpu_fanout_linearity_k8"], 4) if head else None,
        frac_of_loopback_k1_other_style=round(head["other_style"]["frac_of_loopback_k1"], 4)
        if head
        else None,
        definitions={
            "frac_of_loopback_k1": "(2 * bytes / (push_s + pull_s at K=1)) / raw TCP bytes/s at K=1",
            "cpu_frac_of_loopback_k1": "2 * raw TCP CPU-s/GB (sender + receiver) / (push CPU-s/GB "
            "(trainer side + weight-sync) + pull CPU-s/GB (weight-sync + replica)), K=1",
            "fanout_vs_raw_k8": "raw TCP seconds to deliver the payload to 8 receivers / "
            "T_all(K=8) (the fan-out target, >= 0.8)",
            "fanout_efficiency_k8": "T_all(K=1) / T_all(K=8); T_all = release of the pullers "
            "until the last holds the version (verified, reported); informational",
        },
        sizes=results,
        skipped=skipped,
    )
    _common.write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
