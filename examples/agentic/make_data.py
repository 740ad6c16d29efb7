"""Writes the calculator example's data and model offline.

Problems: "What is 437 - 58?" (two numbers of 2-3 digits, + - or *), far beyond what the
tiny demo model can compute, but a calculator can.

- SFT transcripts (``--sft``): one JSONL row per problem, ``{"messages": [...]}``, the
  conversation a tool-using model would have in the ``tools`` environment: the user's
  question, an assistant turn that calls the calculator in the Hermes / Qwen format the
  environment parses (``<tool_call>\\n{"name": "calculator", "arguments":
  {"expression": "437 - 58"}}\\n</tool_call>``), the tool's reply exactly as the
  environment gives it (role ``tool``, the calculator's own output, "379"), and the
  final assistant turn with the number.
- RL rows (``--rl``): ``{"question": "What is 437 - 58?", "answer": "379"}``; the
  ``tools`` environment reads ``question`` as the user turn and scores the final turn
  against ``answer`` with math-verify.
- The model (``model_dir``): a tiny Llama (2 layers, 128 wide, 0.57M parameters), randomly
  initialised, with a tokenizer trained on this task's text and a chat template that
  renders system, user, assistant and tool turns, closes each assistant turn with the
  EOS token and only ever appends (what episodes and SFT transcripts need). Built once
  and cached under ``~/.cache/rlfleet`` like the demo model. ``model_dir`` says why it
  is not the demo model.

    python examples/agentic/make_data.py --sft examples/data/agentic_sft.jsonl \\
        --rl examples/data/agentic_rl.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OPERATORS = ("+", "-", "*")
QUESTION = "What is {expression}?"
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
"""[user] What is 437 - 58?\\n[assistant] <tool_call>...</tool_call></s>\\n[tool] 379\\n
[assistant] 379</s>\\n. It ignores ``tools=`` (the environment runs with tool_prompt
"none": the model learns the call format from the transcripts, which keeps prompts short)
and a tool message's ``name``, so transcripts and episodes render the same whatever they
carry."""
MODEL_INFO_FILE = "rlfleet_agentic_model.json"


def problem(rng: random.Random) -> tuple[str, str]:
    """(expression, the calculator's result), e.g. ("437 - 58", "379")."""
    from rlfleet.env.calculator import calculate

    a, b = (rng.randint(10, 999) for _ in range(2))
    expression = f"{a} {rng.choice(OPERATORS)} {b}"
    return expression, calculate(expression)


def tool_call(expression: str) -> str:
    """The assistant turn that calls the calculator, as Qwen2.5/Qwen3 and Hermes write it."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def transcript(expression: str, result: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": QUESTION.format(expression=expression)},
        {"role": "assistant", "content": tool_call(expression)},
        {"role": "tool", "name": "calculator", "content": result},
        {"role": "assistant", "content": result},
    ]


def direct(expression: str, result: str) -> list[dict[str, str]]:
    return [
        {"role": "user", "content": QUESTION.format(expression=expression)},
        {"role": "assistant", "content": result},
    ]


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
    tmp.replace(path)
    return path


def write_sft(path: Path, rows: int = 4000, seed: int = 1, direct_fraction: float = 0.0) -> Path:
    """Transcripts; ``direct_fraction`` of them answer at once, without the calculator
    (the correct number, as a demonstrator who did the sum would write it). Default 0:
    measured with 0.3, the model had not learnt to copy numbers after 250 SFT steps (the
    direct answers' digits are noise to it), its tool calls earned nothing, and RL then
    taught it to stop calling the calculator (env_tool_call_rate 0.58 -> 0.03)."""
    rng = random.Random(seed)

    def row():
        expression, result = problem(rng)
        if rng.random() < direct_fraction:
            return {"messages": direct(expression, result)}
        return {"messages": transcript(expression, result)}

    return _write(path, (row() for _ in range(rows)))


def write_rl(path: Path, rows: int = 2000, seed: int = 2) -> Path:
    rng = random.Random(seed)

    def row():
        expression, result = problem(rng)
        return {"question": QUESTION.format(expression=expression), "answer": result}

    return _write(path, (row() for _ in range(rows)))


MODEL_SETTINGS = {
    "template": CHAT_TEMPLATE,
    "corpus_rows": 3000,
    "corpus_seed": 0,
    "digits": "individual",
    "vocab_size": 512,
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "max_positions": 256,
    "seed": 0,
}
"""Everything that shapes the example's model; its hash names the cache entry."""


def model_dir(cache_dir: Path, say=print) -> Path:
    """The example's base model (built once, cached): a tiny Llama, randomly initialised,
    with a byte-level BPE tokenizer trained on text of this task (questions, tool calls,
    results) and the chat template above. What it knows of tools, the SFT stage teaches.

    Why not the demo model: its tokenizer was trained on "Calculate 7 - 9. Answer:" only
    and spells a tool call's JSON nearly byte by byte (~85 tokens a call, ~145 a
    transcript, past its 128 positions); this one needs ~30 and ~56. What the SFT stage
    must teach beyond the fixed JSON is copying: the numbers from the question into the
    call, the tool's result into the answer. Measured in-process (the same transcripts
    and loss, lr 3e-3, 64 a step; 32 episodes sampled at temperature 1): the demo model
    (its context stretched to 256) answered 0% right after 480 steps, 25% after 600; this
    model 50% after 200, 84% after 280. The tokenizer splits numbers into single digits (as Qwen's and Llama 3's
    do), so "874" is the same three tokens after a space and after a quote."""
    from rlfleet.cli.demo_model import build_cached, settings_key

    s = MODEL_SETTINGS

    def build(out: Path) -> None:
        rng = random.Random(s["corpus_seed"])
        texts = ["".join(f"[{m['role']}] {m['content']}\n" for m in transcript(*problem(rng)))
                 for _ in range(s["corpus_rows"])]  # fmt: skip
        _build_model(out, texts, s)
        (out / MODEL_INFO_FILE).write_text(json.dumps({"settings": s}, indent=2))

    return build_cached(cache_dir, f"agentic-model-{settings_key(s)}", MODEL_INFO_FILE,
                        build, say=say, what="calculator example model")  # fmt: skip


def _build_model(out: Path, texts: list[str], s: dict) -> None:
    """A byte-level BPE tokenizer that splits numbers into single digits (as Qwen's and
    Llama 3's do: "874" is the same three tokens after a space or a quote, so copying a
    number is copying digits) and a randomly initialised Llama."""
    import torch
    from rlfleet.common.tinymodel import BOS, EOS, PAD, llama_config, train_tokenizer
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = train_tokenizer(texts, vocab_size=s["vocab_size"], split_digits=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                     pad_token=PAD, chat_template=s["template"])  # fmt: skip
    hf_tok.save_pretrained(out)
    torch.manual_seed(s["seed"])
    config = llama_config(tok, hidden_size=s["hidden_size"], num_layers=s["num_layers"],
                          num_heads=s["num_heads"], max_positions=s["max_positions"])  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sft", type=Path, default=Path("examples/data/agentic_sft.jsonl"))
    parser.add_argument("--rl", type=Path, default=Path("examples/data/agentic_rl.jsonl"))
    parser.add_argument("--sft-rows", type=int, default=4000)
    parser.add_argument("--rl-rows", type=int, default=2000)
    parser.add_argument("--direct-fraction", type=float, default=0.0)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rlfleet")
    args = parser.parse_args()
    sft = write_sft(args.sft, args.sft_rows, direct_fraction=args.direct_fraction)
    print(f"wrote {sft} ({args.sft_rows} transcripts)")
    print(f"wrote {write_rl(args.rl, args.rl_rows)} ({args.rl_rows} RL rows)")
    print(f"model: {model_dir(args.cache_dir)}")
