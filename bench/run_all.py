"""`make bench`: every bench script, one after another, then a table of their headline figures.

Each script runs as its own process with ``--json`` (and ``--quick`` when asked),
so one that fails or runs out of time does not take the others with it. The
collected figures go to ``bench/results/README.md`` (a markdown table against
the targets, with the machine's load next to each) and the reward-curve plots
that vs_trl.py (and any other script that draws) leaves in ``bench/results/``.

    .venv/bin/python bench/run_all.py [--quick] [--only vs_trl,buffer]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common

BENCH = Path(__file__).resolve().parent

# (script, headline keys of its JSON, the target). Scripts not listed here still run, after
# these, with their top-level numbers as headline.
KNOWN: list[tuple[str, list[str], str]] = [
    ("vs_trl", ["step_time_ratio_trl_over_rlfleet", "reward_last5", "step_time_ratio_long_tail"],
     "TRL s/step over rlfleet s/step >= 1 (same job); > 1 on long-tailed lengths; "
     "rlfleet final reward >= TRL's"),
    ("weightsync", ["frac_of_loopback_k1", "fanout_efficiency_k8", "raw_fanout_efficiency_k8",
                    "cpu_frac_of_loopback_k1", "cpu_fanout_linearity_k8"],
     ">= 0.6 of raw loopback TCP with one replica; near-linear fan-out to 8"),
    ("buffer", ["frac_of_raw", "frac_of_raw_min", "frac_of_raw_with_protobuf"], ">= 0.5 of a raw redis-py XADD/XREADGROUP loop"),
    ("trainer", ["frac_of_plain", "frac_of_plain_tiny"], ">= 0.9 of a plain PyTorch loop"),
    ("icepop", ["overhead_frac", "masked_frac_mean", "reward_last5"],
     "IcePop's cost over no correction; masked fraction; reward per correction"),
    ("c3po", [], "C3PO++ against the synchronous baseline"),
    ("rollout", ["ratios"], "rollout engine throughput against its baselines"),
]  # fmt: skip
BOOKKEEPING = {"bench", "quick", "wall_s", "load_at_end", "machine", "argv"}


def scripts() -> list[tuple[str, list[str], str]]:
    """The known scripts that exist, then any other bench script (not _*.py, not this one)."""
    known = [entry for entry in KNOWN if (BENCH / f"{entry[0]}.py").is_file()]
    names = {name for name, _k, _t in KNOWN} | {"run_all"}
    others = sorted(
        p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_") and p.stem not in names
    )
    return known + [(name, [], "") for name in others]


def numbers(data: dict, limit: int = 6) -> dict:
    """Top-level numbers of a JSON report, one level of nesting flattened (a > b)."""
    out = {}
    for key, value in data.items():
        if key in BOOKKEEPING:
            continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = value
        elif isinstance(value, dict):
            for sub, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"{key} > {sub}"] = v
        if len(out) >= limit:
            break
    return dict(list(out.items())[:limit])


def verdict(name: str, data: dict) -> str:
    """Met / missed against the issue's targets, part by part, where a target is a number."""

    def mark(ok: bool) -> str:
        return "met" if ok else "missed"

    try:
        if name == "vs_trl":
            parts = [
                f"speed {mark(data['step_time_ratio_trl_over_rlfleet'] >= 1.0)}",
                f"reward {mark(data['reward_last5']['rlfleet'] >= data['reward_last5']['trl'])}",
            ]
            if data.get("step_time_ratio_long_tail") is not None:
                parts.append(f"long tail {mark(data['step_time_ratio_long_tail'] > 1.0)}")
            return "; ".join(parts)
        if name == "weightsync":
            return f"one replica {mark(data['frac_of_loopback_k1'] >= 0.6)}"
        if name == "buffer":
            return mark(data["frac_of_raw"] >= 0.5)
        if name == "trainer":
            return mark(data["frac_of_plain"] >= 0.9)
    except (KeyError, TypeError):
        pass
    return ""


def fmt(value) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3f}"
    return "–" if value is None else str(value)


def run_one(name: str, *, quick: bool, out: Path, timeout_s: float) -> dict:
    script = BENCH / f"{name}.py"
    if not script.is_file():
        return {"status": "absent"}
    cmd = [sys.executable, str(script), "--json", str(out)] + (["--quick"] if quick else [])
    print(f"\n=== {name} ({_common.load_note()}): {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False
        )
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout_s:.0f}s"
    result = {"status": status, "seconds": round(time.monotonic() - start, 1)}
    if status == "ok" and out.is_file():
        result["data"] = json.loads(out.read_text())
    return result


def write_readme(results: dict[str, dict], *, quick: bool, path: Path) -> None:
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bench/run_all.py{' --quick' if quick else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        "Each figure is a ratio against a baseline run in the same invocation on the same "
        "machine; the load average (over the CPU count) next to it says how busy the machine "
        "was. bench/README.md says what every figure means.",
        "",
        "| bench | figure | value | target | verdict | load | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, keys, target in scripts():
        res = results.get(name)
        if res is None:
            continue
        if res["status"] != "ok":
            lines.append(
                f"| {name} | – | {res['status']} | {target} | | | {res.get('seconds', '')}s |"
            )
            continue
        data = res["data"]
        load = data.get("load_at_end", {})
        load_s = f"{load.get('loadavg_1m', '?')} / {load.get('cpus', '?')}"
        figures = {k: data[k] for k in keys if k in data} or numbers(data)
        for i, (key, value) in enumerate(figures.items()):
            first = i == 0  # the bench's own columns only on its first row
            cells = [
                name if first else "",
                key,
                fmt(value),
                target if first else "",
                verdict(name, data) if first else "",
                load_s if first else "",
                f"{res['seconds']}s" if first else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    if pngs:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({name})" for name in pngs]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="comma-separated script names to run")
    p.add_argument("--timeout", type=float, default=0, help="seconds per script (0: a default)")
    args = p.parse_args(argv)
    out_dir = _common.RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    only = {n for n in args.only.split(",") if n}
    timeout_s = args.timeout or (600 if args.quick else 900)
    results: dict[str, dict] = {}
    started = time.monotonic()
    for name, _keys, _target in scripts():
        if only and name not in only:
            continue
        res = run_one(name, quick=args.quick, out=out_dir / f"{name}.json", timeout_s=timeout_s)
        if res["status"] == "absent":
            continue
        results[name] = res
        print(f"=== {name}: {res['status']} in {res['seconds']}s", flush=True)
    write_readme(results, quick=args.quick, path=out_dir / "README.md")
    headline = {name: keys for name, keys, _target in scripts()}
    summary = {}
    for name, r in results.items():
        summary[name] = {"status": r["status"], "seconds": r["seconds"]}
        if "data" in r:
            summary[name].update({k: r["data"].get(k) for k in headline[name] if k in r["data"]})
    print(f"\nall benches done in {time.monotonic() - started:.0f}s")
    for name, s in summary.items():
        print(f"  {name:<11} {fmt(s)}")
    _common.write_json(args.json, {"results": summary, "quick": args.quick})
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
