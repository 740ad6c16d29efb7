"""What every bench script shares: its flags, the machine's load, and its JSON report.

Each script runs a baseline and rlfleet in the same invocation and reports the
ratio, so the figures are comparable even on a noisy, shared machine; the load
average is written next to every figure so a reader can tell a quiet run from a
busy one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process has used so far (all its threads)."""
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a smaller run (under 5 minutes)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    return p


def load() -> dict:
    """The machine's load: 1/5/15-minute load averages over its CPU count."""
    one, five, fifteen = os.getloadavg()
    return {
        "loadavg_1m": round(one, 2),
        "loadavg_5m": round(five, 2),
        "loadavg_15m": round(fifteen, 2),
        "cpus": os.cpu_count(),
    }


def load_note() -> str:
    info = load()
    return f"load {info['loadavg_1m']:.2f} / {info['cpus']} CPUs"


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        torch_version = version("torch")  # without importing torch (seconds on a busy machine)
    except PackageNotFoundError:
        torch_version = None
    return {
        "python": platform.python_version(),
        "torch": torch_version,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def report(name: str, *, quick: bool, started: float, **fields) -> dict:
    """The JSON every script writes: headline figures first, then details."""
    return {
        "bench": name,
        "quick": quick,
        **fields,
        "wall_s": round(time.monotonic() - started, 1),
        "load_at_end": load(),
        "machine": machine(),
        "argv": sys.argv[1:],
    }


def write_json(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    print(f"wrote {path}")


def table(headers: Sequence[str], rows: Sequence[Sequence], *, title: str = "") -> str:
    """A plain fixed-width table for the terminal."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)
    ]
    lines = [title] if title else []
    lines.append("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def geomean(values: Sequence[float]) -> float:
    import math

    vals = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else 0.0
