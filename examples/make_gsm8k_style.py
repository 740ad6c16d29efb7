"""Writes a GSM8K-style JSONL dataset offline: short word problems whose ``answer`` is a
worked solution ending in "#### N", as GSM8K's are. For `examples/gsm8k_style.toml`
(task.kind = "dataset", answer_regex picks N out, math-verify scores it).

    python examples/make_gsm8k_style.py examples/data/gsm8k_style.jsonl [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ali", "Bea", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana"]
THINGS = ["apples", "marbles", "stickers", "books", "coins", "shells"]


def problem(rng: random.Random) -> dict:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    if rng.random() < 0.5:
        question = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have?"
        steps, total = f"{name} has {a} + {b} = {a + b} {thing}.", a + b
    else:
        a, b = max(a, b), min(a, b)
        question = f"{name} has {a} {thing} and gives away {b}. How many {thing} are left?"
        steps, total = f"{name} has {a} - {b} = {a - b} {thing} left.", a - b
    return {"question": question, "answer": f"{steps}\n#### {total}"}


def write(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for _ in range(rows):
            out.write(json.dumps(problem(rng)) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write(args.out, args.rows, args.seed)} ({args.rows} rows)")
