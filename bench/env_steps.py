"""Multi-turn episodes: the environment's side of a turn, one Step after another against
all of a turn's Steps at once (``scheduler/episodes.step_all``).

A sync episode job (``task.environment``) sends each model turn of the step's episodes
to the env service, and a turn that calls a tool waits for it there. The costliest
built-in tool is the ``tools`` environment's python tool: a sandboxed python process
per call (start it, run the code, collect its output). Here, on a real env service
process on loopback with its real sandbox, N episodes (32; quick: 16) each take one
turn that calls python with a small program:

- baseline: ``EnvTurns.after_turn`` for each episode one after another (what the
  scheduler did before ``step_all``);
- rlfleet: ``step_all``, up to ``STEP_WORKERS`` Steps in flight.

The model's turn is a canned tool call (no model runs: the rollout itself is the same
either way, and a tiny model does not call tools); the env service, the sandbox, the
chat-template rendering of the tool's reply and the gRPC calls are the product's.
Rounds alternate between the two (3; quick: 2), fresh episodes each, and each way's
median over its rounds is kept. The verdict: baseline seconds over rlfleet's >= 1.5 (a sandbox start
is CPU work, so the machine's cores bound the gain; printed with the cores).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path

import _common

TARGET = 1.5
PROGRAM = "import math\nprint(sum(math.isqrt(i) for i in range(20000)))"
TURN = (
    "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": PROGRAM}}) + "</tool_call>"
)
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


def chat_model(work: Path) -> Path:
    """The tiny model with a chat template (its tokenizer renders the tool's replies)."""
    from rlfleet.common.tinymodel import build_tiny_model

    path = build_tiny_model(work / "model", seed=0)
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return path


def episodes_env(model: Path, clients):
    """EnvTurns for a `tools` job on ``model``, as the scheduler builds it for a step."""
    from rlfleet.common.jobspec import JobSpec
    from rlfleet.scheduler.episodes import EnvTurns
    from rlfleet.scheduler.samples import load_codec
    from rlfleet.scheduler.strategy import StepContext

    spec = JobSpec.model_validate({
        "model": {"path": str(model)},
        "task": {"name": "basic_arithmetic",
                 "environment": {"name": "tools", "max_turns": 4,
                                 "options": {"tools": ["python"], "max_turns": 4}}},
        "sampling": {"max_new_tokens": 64},
    })  # fmt: skip
    ctx = StepContext("bench-env", spec, 0, 0, load_codec(str(model)), None, threading.Event())
    return EnvTurns(ctx, clients)


def one_round(env, n: int, *, concurrent: bool) -> float:
    """Seconds for turn 0 of ``n`` fresh episodes, each a python tool call."""
    from rlfleet.scheduler.episodes import start_episodes, step_all

    row = json.dumps({"question": "What is 2 + 2?", "answer": "4"})
    tag = uuid.uuid4().hex[:6]
    episodes = start_episodes(env, [(f"{tag}-{i}", f"g{i}", row) for i in range(n)])
    turn = env.ctx.codec.encode(TURN)
    for e in episodes:
        e.add(turn, [0.0] * len(turn), [0] * len(turn), model=True)
    try:
        start = time.perf_counter()
        if concurrent:
            outcomes = step_all(env, [(e, turn) for e in episodes], 0)
        else:
            outcomes = [env.after_turn(e.episode_id, 0, turn, length=len(e.tokens),
                                       prompt_len=len(e.prompt_ids), what=e.seq_id)
                        for e in episodes]  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        env.close([e.episode_id for e in episodes])
    calls = sum(o.tool_calls for o in outcomes)
    if calls != n:  # each Step ran its python call (the tiny context may end the episode)
        raise RuntimeError(f"expected {n} python calls; the environment ran {calls}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=0, help="episodes per turn (32; quick 16)")
    p.add_argument("--rounds", type=int, default=0, help="rounds each way (3; quick 2)")
    args = p.parse_args(argv)
    n = args.episodes or (16 if args.quick else 32)
    rounds = args.rounds or (2 if args.quick else 3)
    started = time.monotonic()
    from rlfleet.common.procs import start_service
    from rlfleet.scheduler.clients import ServiceClients
    from rlfleet.scheduler.episodes import STEP_WORKERS

    print(f"env steps bench ({_common.load_note()}): {n} episodes, a python call each, "
          f"{rounds} rounds each way")  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="rlfleet-env-steps-"))
    service = start_service("env", "rlfleet.env", ["--host", "127.0.0.1", "--port", "0",
                                                   "--log-format", "text"], run_dir=work)  # fmt: skip
    clients = ServiceClients(reward_address="127.0.0.1:1", trainer_address="127.0.0.1:1",
                             env_address=service.address)  # fmt: skip
    times: dict[str, list[float]] = {"one_by_one": [], "step_all": []}
    try:
        env = episodes_env(chat_model(work), clients)
        one_round(env, 4, concurrent=True)  # warm: the sandbox's first start, imports
        for _ in range(rounds):
            times["one_by_one"].append(one_round(env, n, concurrent=False))
            times["step_all"].append(one_round(env, n, concurrent=True))
    finally:
        clients.close()
        service.stop()
        shutil.rmtree(work, ignore_errors=True)

    baseline, ours = (statistics.median(times[k]) for k in ("one_by_one", "step_all"))
    ratio = baseline / ours
    rows = [[k, n, statistics.median(v), n / statistics.median(v), *v] for k, v in times.items()]
    print(_common.table(["how", "episodes", "median s", "steps/s",
                         *(f"round {i + 1}" for i in range(rounds))], rows))  # fmt: skip
    met = ratio >= TARGET
    verdict = "met" if met else f"MISSED by {TARGET - ratio:.2f}"
    print(f"turn of {n} python calls: one by one {baseline:.3f}s, step_all {ours:.3f}s "
          f"({STEP_WORKERS} in flight): {ratio:.2f}x (target >= {TARGET}: {verdict})")  # fmt: skip
    if not met:
        per_call = baseline / n
        print(f"  where the time goes: {per_call * 1e3:.0f} ms a call one by one; at once the "
              f"calls share {_common.machine()['cpus']} cores (a sandbox start is CPU work)")  # fmt: skip
    _common.write_json(args.json, _common.report(
        "env_steps", quick=args.quick, started=started, ratio=round(ratio, 3), target=TARGET,
        met=met, episodes=n, step_workers=STEP_WORKERS,
        seconds={k: [round(x, 4) for x in v] for k, v in times.items()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
