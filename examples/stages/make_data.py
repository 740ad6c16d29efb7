"""Writes the three-stage example's data offline: reasoning-gym arithmetic in the demo
model's prompt distribution ("Calculate 7 - 9."), one JSONL row per problem with
``question``, ``answer`` (the number, which math-verify compares) and ``worked`` (the
answer as a sentence, " The answer is -2.", the SFT stage's target).

    python examples/stages/make_data.py examples/data/arithmetic_stages.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WORKED = " The answer is {answer}."


def write(path: Path, rows: int = 2000, seed: int = 4242) -> Path:
    import reasoning_gym
    from rlfleet.cli.demo_model import DEMO_TASK_NAME, DEMO_TASK_PARAMS

    data = reasoning_gym.create_dataset(DEMO_TASK_NAME, size=rows, seed=seed, **DEMO_TASK_PARAMS)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        for entry in data:
            answer = str(entry["answer"])
            row = {"question": entry["question"], "answer": answer,
                   "worked": WORKED.format(answer=answer)}  # fmt: skip
            out.write(json.dumps(row) + "\n")
    return path


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--rows", type=int, default=2000)
    args = parser.parse_args()
    print(f"wrote {write(args.out, args.rows)} ({args.rows} rows)")
