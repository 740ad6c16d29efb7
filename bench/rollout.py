"""Rollout throughput: the vLLM engine, our PyTorch engine and ``transformers``' ``generate``.

Output tokens per second of three ways to sample the same completions from the
same model, in one invocation, on a workload whose output lengths vary widely,
as RL rollouts' do (most answers are short, a few run to the length limit).

Workload (identical for all three, written to one file the workers read):

- model: a randomly initialised Llama (``common/tinymodel.py``, float32, vocab 512,
  head_dim 64 so vLLM's CPU attention takes it): hidden 256 x 4 layers with
  ``--quick`` (4.3M parameters), hidden 512 x 6 layers otherwise (~25M);
- prompts: reasoning-gym ``basic_arithmetic`` questions (5-21 tokens, mean 11);
- output lengths: each sequence gets its own limit, drawn from a lognormal
  (median ``--median-len``, sigma 1, clipped to [4, ``--max-len``]): a long tail
  where the longest of the batch is ~5-10x the mean. The random model's EOS ends
  some sequences earlier still (~5 % fewer tokens than the limits allow); every
  engine stops on it alike, and each is credited the tokens it really produced;
- sampling: temperature 1, no top-p/top-k, with each token's log-prob recorded
  (what RL needs; ``generate`` keeps its scores and the log-probs are taken after).

How each runs it:

- ``vllm``: ``setup_engine("vllm")`` (``rollout/vllm_engine.py``, vLLM's continuous
  batching), the fleet's default settings (eager on CPU), one Generate call per
  distinct length limit, all issued at once (``vllm_compiled``, on request with
  ``--engines``: the same with torch.compile, vLLM's default on GPU);
- ``torch``: ``setup_engine("torch")`` (``rollout/torch_engine.py``), the same calls;
- ``hf_generate``: one ``model.generate`` over the whole left-padded batch, run until
  its longest sequence ends; a per-row stopping criterion ends each row at its own
  limit (as EOS would), and the finished rows ride along as padding.

Each engine runs in a process of its own (vLLM on CPU binds threads and disables
``torch.set_num_threads`` in its process), all with the same ``OMP_NUM_THREADS``
(``--threads``, 1 by default); the repeats are interleaved (vllm, torch, hf, vllm,
...) so machine noise falls on all alike; tok/s is the median over repeats. The
vLLM worker runs under this interpreter when it has vLLM, else under ``.venv-vllm``
(scripts/install_vllm.sh); with neither, only torch and hf_generate are measured,
and the report says so.

    .venv-vllm/bin/python bench/rollout.py --quick --json bench/results/rollout.json

``--startup`` instead measures each engine's start in a fresh process on the tiny
model (import, build, first Generate, resident memory), vLLM eager and compiled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common

CACHE_DIR = _common.REPO_ROOT / "runs" / "bench-cache"
ENGINES = ("vllm", "torch", "hf_generate")
OPTIONAL_ENGINES = ("vllm_compiled",)  # vLLM with torch.compile: 8-22 s more to start here
MARK = "@@rollout-bench "  # prefixes the worker's answers; vLLM writes its own logs to stdout


# -- the workload (parent process) ----------------------------------------------------


def build_model(*, hidden: int, layers: int, max_positions: int) -> Path:
    from rlfleet.common.tinymodel import arithmetic_corpus, build_tiny_model

    path = CACHE_DIR / f"rollout-h{hidden}-l{layers}-p{max_positions}"
    if not (path / "config.json").is_file():
        build_tiny_model(
            path,
            texts=arithmetic_corpus(),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=hidden // 64,  # head_dim 64: vLLM's CPU attention needs >= 32
            max_positions=max_positions,
            seed=0,
        )
    return path


def make_workload(model: Path, *, seqs: int, median_len: int, max_len: int, seed: int) -> dict:
    """Prompts (token ids) and per-sequence length limits, drawn once for every engine."""
    import reasoning_gym
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    ds = reasoning_gym.create_dataset(
        "basic_arithmetic", size=seqs, seed=seed, min_terms=2, max_terms=5, min_digits=1,
        max_digits=3,
    )  # fmt: skip
    prompts = [tok.encode(e["question"]).ids for e in ds]
    rng = random.Random(seed)
    limits = [
        min(max_len, max(4, round(math.exp(rng.gauss(math.log(median_len), 1.0)))))
        for _ in range(seqs)
    ]
    return {"model": str(model), "prompts": prompts, "limits": limits}


def describe_limits(limits: list[int]) -> dict:
    s = sorted(limits)
    return {
        "n": len(s),
        "mean": round(statistics.fmean(s), 1),
        "p50": s[len(s) // 2],
        "p90": s[int(0.9 * (len(s) - 1))],
        "max": s[-1],
        "sum": sum(s),
    }


# -- workers (one process per engine) ------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _EngineRunner:
    """Runs the workload on a rollout engine: one Generate call per distinct length limit."""

    def __init__(self, kind: str, workload: dict, *, threads: int):
        import torch
        from rlfleet.rollout.engine import setup_engine

        torch.set_num_threads(threads)
        n = len(workload["prompts"])
        if kind.startswith("vllm"):
            # KV cache for every sequence at its longest, plus room.
            tokens = n * (max(map(len, workload["prompts"])) + max(workload["limits"]))
            config = json.loads((Path(workload["model"]) / "config.json").read_text())
            per_token = 2 * config["num_hidden_layers"] * config["hidden_size"] * 4
            kv_gib = max(0.0625, 1.5 * tokens * per_token / 2**30)
            self.engine = setup_engine(
                "vllm",
                dtype="float32",
                max_batch_seqs=n,
                kv_cache_gib=kv_gib,
                enforce_eager=kind == "vllm",  # the fleet's default on CPU
            )
        else:
            self.engine = setup_engine("torch", device="cpu", dtype="float32", max_batch_seqs=n)
        self.engine.load_model(workload["model"])
        self.workload = workload

    def run(self, *, prompts: list[list[int]], limits: list[int], seed: int) -> int:
        from rlfleet.rollout.engine import Sampling, SeqRequest

        by_limit: dict[int, list[SeqRequest]] = {}
        for i, (prompt, limit) in enumerate(zip(prompts, limits, strict=True)):
            by_limit.setdefault(limit, []).append(SeqRequest(f"s{i}", list(prompt)))
        tokens = [0]
        lock = threading.Lock()
        errors: list[BaseException] = []

        def on_result(result) -> None:
            with lock:
                tokens[0] += len(result.token_ids)

        def call(limit: int, seqs: list) -> None:
            try:
                self.engine.generate(
                    seqs,
                    Sampling(max_new_tokens=limit, temperature=1.0, seed=seed),
                    abort=threading.Event(),
                    on_result=on_result,
                )
            except BaseException as exc:  # noqa: BLE001 - reported by the caller
                errors.append(exc)

        threads = [threading.Thread(target=call, args=item) for item in by_limit.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return tokens[0]

    def close(self) -> None:
        self.engine.close()


class _HfRunner:
    """``model.generate`` over the whole batch, each row stopped at its own limit."""

    def __init__(self, workload: dict, *, threads: int):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(
            workload["model"], dtype=torch.float32
        ).eval()
        config = self.model.config
        self.pad = config.pad_token_id
        self.eos = config.eos_token_id

    def run(self, *, prompts: list[list[int]], limits: list[int], seed: int) -> int:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        width = max(map(len, prompts))
        ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        limit_t = torch.tensor(limits)

        class RowLimit(StoppingCriteria):
            """Ends each row at its own length limit, the way EOS ends a row."""

            def __call__(self, input_ids, scores, **kwargs):
                return (input_ids.shape[1] - width) >= limit_t

        torch.manual_seed(seed)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max(limits),
                stopping_criteria=StoppingCriteriaList([RowLimit()]),
                pad_token_id=self.pad,
                eos_token_id=self.eos,
                output_scores=True,
                return_dict_in_generate=True,
            )
            # The sampled tokens' log-probs, as the engines record them.
            new = out.sequences[:, width:]
            scores = torch.stack(out.scores, dim=1).log_softmax(-1)
            scores.gather(-1, new.unsqueeze(-1))
        # Tokens each row really produced: up to its EOS (included) or its limit.
        total = 0
        for row, limit in zip(new.tolist(), limits, strict=True):
            row = row[:limit]
            total += row.index(self.eos) + 1 if self.eos in row else len(row)
        return total

    def close(self) -> None:
        pass


def worker_main(kind: str, workload_path: Path, threads: int) -> None:
    """Builds one engine, then answers ``run <seed>`` lines on stdin until ``quit``."""
    out = sys.stdout

    def answer(**fields) -> None:
        out.write(MARK + json.dumps(fields) + "\n")
        out.flush()

    workload = json.loads(workload_path.read_text())
    t0 = time.monotonic()
    runner = (
        _HfRunner(workload, threads=threads)
        if kind == "hf_generate"
        else _EngineRunner(kind, workload, threads=threads)
    )
    start_s = time.monotonic() - t0
    # Warm-up at the full batch size: first calls allocate, build kernels and caches.
    t0 = time.monotonic()
    n = len(workload["prompts"])
    runner.run(prompts=workload["prompts"], limits=[16] * n, seed=12345)
    answer(ready=True, start_s=round(start_s, 2), warmup_s=round(time.monotonic() - t0, 2),
           rss_mib=round(_rss_mib(), 1))  # fmt: skip
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        seed = int(cmd[1])
        t0 = time.monotonic()
        tokens = runner.run(prompts=workload["prompts"], limits=workload["limits"], seed=seed)
        seconds = time.monotonic() - t0
        answer(tokens=tokens, seconds=round(seconds, 3), tok_s=round(tokens / seconds, 1),
               load_1m=round(os.getloadavg()[0], 2), rss_mib=round(_rss_mib(), 1))  # fmt: skip
    runner.close()


class Worker:
    """The parent's handle on one engine's process."""

    def __init__(self, kind: str, python: str, workload: Path, *, threads: int, log: Path):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
        }
        self.kind = kind
        self.log = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [python, __file__, "--worker", kind, "--workload", str(workload),
             "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
        )  # fmt: skip

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
            self._log.write(line)
        self._log.flush()
        tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"the {self.kind} worker exited ({self.proc.wait()}):\n{tail}")

    def run(self, seed: int) -> dict:
        self.proc.stdin.write(f"run {seed}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


# -- start time and memory (``--startup``) -------------------------------------------

STARTUPS = ("torch", "vllm_eager", "vllm_compiled")


def startup_worker(kind: str, model: str) -> None:
    """One fresh process: import, build the engine, first Generate; times and RSS of each."""
    t0 = time.monotonic()
    import torch  # noqa: F401 - timed: every engine pays it
    from rlfleet.rollout.engine import Sampling, SeqRequest, setup_engine

    fields: dict = {"import_torch_s": round(time.monotonic() - t0, 2)}
    if kind == "torch":
        engine = setup_engine("torch", device="cpu", dtype="float32")
    else:
        t0 = time.monotonic()
        import vllm  # noqa: F401

        fields["import_vllm_s"] = round(time.monotonic() - t0, 2)
        engine = setup_engine(
            "vllm", dtype="float32", kv_cache_gib=0.0625, enforce_eager=kind == "vllm_eager"
        )
    fields["rss_before_build_mib"] = round(_rss_mib(), 1)
    t0 = time.monotonic()
    engine.load_model(model)
    fields["build_s"] = round(time.monotonic() - t0, 2)
    fields["rss_built_mib"] = round(_rss_mib(), 1)
    t0 = time.monotonic()
    engine.generate(
        [SeqRequest(f"s{i}", [5, 6, 7, 8]) for i in range(8)],
        Sampling(max_new_tokens=16),
        abort=threading.Event(),
        on_result=lambda r: None,
    )
    fields["first_generate_s"] = round(time.monotonic() - t0, 2)
    fields["rss_after_generate_mib"] = round(_rss_mib(), 1)
    fields["load_1m"] = round(os.getloadavg()[0], 2)
    engine.close()
    sys.stdout.write(MARK + json.dumps(fields) + "\n")
    sys.stdout.flush()


def startup(args, vllm_py: str | None, vllm_note: str) -> dict:
    """Start time and resident memory of each engine on the shared tiny model's shape
    (hidden 64, 2 layers; 2 heads of 32, as vLLM's CPU attention needs), fresh processes."""
    from rlfleet.common.tinymodel import build_tiny_model

    model = CACHE_DIR / "tiny-head32"
    if not (model / "config.json").is_file():
        build_tiny_model(model, num_heads=2, seed=0)
    out = {}
    for kind in STARTUPS:
        python = sys.executable if kind == "torch" else vllm_py
        if python is None:
            continue
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "VLLM_LOGGING_LEVEL": "ERROR"}
        t0 = time.monotonic()
        proc = subprocess.run(
            [python, __file__, "--startup-worker", kind, "--workload", str(model)],
            capture_output=True, text=True, env=env, timeout=900,
        )  # fmt: skip
        wall = time.monotonic() - t0
        line = next((x for x in proc.stdout.splitlines() if x.startswith(MARK)), None)
        if line is None:
            raise RuntimeError(f"startup worker {kind} failed:\n{proc.stderr[-3000:]}")
        out[kind] = {**json.loads(line[len(MARK) :]), "process_wall_s": round(wall, 2)}
        print(f"  {kind:<14} {out[kind]}")
    cols = ["import_torch_s", "import_vllm_s", "build_s", "first_generate_s", "process_wall_s",
            "rss_built_mib", "rss_after_generate_mib", "load_1m"]  # fmt: skip
    print()
    print(_common.table(["engine", *cols], [[k, *(v.get(c, "-") for c in cols)]
                                            for k, v in out.items()],
                        title=f"engine start on the tiny model ({vllm_note})"))  # fmt: skip
    return out


def vllm_interpreter() -> tuple[str | None, str]:
    """Which Python runs the vLLM worker, and why (or why none does)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable, "this interpreter has vLLM"
    try:
        from rlfleet.cli.fleet import vllm_python

        return vllm_python(), "vLLM from .venv-vllm (or $RLFLEET_VLLM_PYTHON)"
    except RuntimeError:
        return None, (
            "vLLM is not installed (no .venv-vllm): measured torch vs hf_generate only; "
            "run scripts/install_vllm.sh, then this with .venv-vllm/bin/python"
        )


def main() -> None:
    p = _common.parser(__doc__.split("\n", 1)[0])
    p.add_argument("--worker", choices=ENGINES + OPTIONAL_ENGINES, help=argparse_hidden())
    p.add_argument("--startup-worker", choices=STARTUPS, help=argparse_hidden())
    p.add_argument(
        "--startup",
        action="store_true",
        help="measure engine start time and RSS on the tiny model instead of throughput",
    )
    p.add_argument("--workload", type=Path, help=argparse_hidden())
    p.add_argument("--seqs", type=int, default=None, help="sequences per run (48; 96)")
    p.add_argument("--median-len", type=int, default=None, help="median length limit (32; 48)")
    p.add_argument("--max-len", type=int, default=None, help="longest length limit (256; 384)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per engine (3; 3)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads per engine (1: steady on a shared machine, where OpenMP "
        "threads spin against other load; on a quiet machine try the core count)",
    )
    p.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help=f"comma-separated, of {', '.join(ENGINES + OPTIONAL_ENGINES)}",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.worker:
        worker_main(args.worker, args.workload, args.threads)
        return
    if args.startup_worker:
        startup_worker(args.startup_worker, str(args.workload))
        return
    if args.startup:
        started = time.monotonic()
        vllm_py, vllm_note = vllm_interpreter()
        print(f"vllm: {vllm_note}; threads: {args.threads}; {_common.load_note()}")
        figures = startup(args, vllm_py, vllm_note)
        payload = _common.report("rollout_startup", quick=args.quick, started=started,
                                 startup=figures, vllm=vllm_note)  # fmt: skip
        _common.write_json(args.json, payload)
        return

    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    started = time.monotonic()
    quick = args.quick
    hidden, layers = (256, 4) if quick else (512, 6)
    seqs = args.seqs or (48 if quick else 96)
    median_len = args.median_len or (32 if quick else 48)
    max_len = args.max_len or (256 if quick else 384)
    repeats = args.repeats or 3
    model = build_model(hidden=hidden, layers=layers, max_positions=1024)
    workload = make_workload(
        model, seqs=seqs, median_len=median_len, max_len=max_len, seed=args.seed
    )
    run_dir = CACHE_DIR / "rollout-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    workload_path = run_dir / "workload.json"
    workload_path.write_text(json.dumps(workload))

    wanted = [e for e in args.engines.split(",") if e]
    vllm_py, vllm_note = vllm_interpreter()
    if vllm_py is None:
        wanted = [k for k in wanted if not k.startswith("vllm")]
    print(f"model: {model.name} (hidden {hidden}, {layers} layers, head_dim 64), float32")
    print(f"workload: {seqs} sequences, length limits {describe_limits(workload['limits'])}")
    print(f"vllm: {vllm_note}; threads per engine: {args.threads}; {_common.load_note()}")

    workers: dict[str, Worker] = {}
    starts: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {k: [] for k in wanted}
    try:
        for kind in wanted:
            python = vllm_py if kind.startswith("vllm") else sys.executable
            workers[kind] = Worker(kind, python, workload_path, threads=args.threads,
                                   log=run_dir / f"{kind}.log")  # fmt: skip
            # Started one at a time: a start competing with another engine's would be slower.
            starts[kind] = workers[kind].read()
            print(f"  {kind:<12} started in {starts[kind]['start_s']:.1f}s "
                  f"(warm-up {starts[kind]['warmup_s']:.1f}s), RSS "
                  f"{starts[kind]['rss_mib']:.0f} MiB; {_common.load_note()}")  # fmt: skip
        for rep in range(repeats):
            for kind in wanted:
                r = workers[kind].run(seed=args.seed + 1000 * (rep + 1))
                runs[kind].append(r)
                print(f"  run {rep + 1}/{repeats} {kind:<12} {r['tokens']:>6} tokens in "
                      f"{r['seconds']:7.2f}s = {r['tok_s']:8.1f} tok/s "
                      f"(load {r['load_1m']})")  # fmt: skip
    finally:
        for w in workers.values():
            w.close()

    tok_s = {k: statistics.median(r["tok_s"] for r in runs[k]) for k in wanted}
    rows = [
        (k, tok_s[k], statistics.median(r["tokens"] for r in runs[k]),
         statistics.median(r["seconds"] for r in runs[k]), starts[k]["start_s"],
         starts[k]["rss_mib"])
        for k in wanted
    ]  # fmt: skip
    print()
    print(_common.table(["engine", "tok/s", "tokens", "seconds", "start s", "RSS MiB"], rows,
                        title="output tokens per second (median over repeats)"))  # fmt: skip
    ratios = {}
    base = tok_s.get("hf_generate")
    for k in wanted:
        if k != "hf_generate" and base:
            ratios[f"{k}_vs_hf_generate"] = round(tok_s[k] / base, 2)
    if "vllm" in tok_s and "torch" in tok_s:
        ratios["vllm_vs_torch"] = round(tok_s["vllm"] / tok_s["torch"], 2)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    print(_common.load_note())
    payload = _common.report(
        "rollout",
        quick=quick,
        started=started,
        tok_s={k: round(v, 1) for k, v in tok_s.items()},
        ratios=ratios,
        vllm=vllm_note,
        workload={
            "model": model.name,
            "hidden": hidden,
            "layers": layers,
            "dtype": "float32",
            "threads": args.threads,
            "limits": describe_limits(workload["limits"]),
            "repeats": repeats,
        },
        starts=starts,
        runs=runs,
    )
    _common.write_json(args.json, payload)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
