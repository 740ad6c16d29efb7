"""Peak memory of the trainer's log-prob pass against response length: the full-logits
path (the model's B × L × V logits, a float copy and a log-softmax) against the chunked
path (rlfleet.trainer.logprobs: the head applied 1K tokens at a time under checkpointing).

A 152K-vocabulary model (Qwen2.5's 152,064) with a tiny body, so the logits dominate
the way they do for a real model at long responses. Each (path, length) runs in its own
process, which builds the model and the batch, then one forward + backward of the
summed response log-probs (what a training micro-batch does); the figure is that
process's peak resident memory during the pass (the peak reset just before it, so
building the model does not count) over its resident memory then.
A third path, "activations", runs the body alone (no head): what any method must keep.
The target: the chunked peak grows with length no faster than the activations do, i.e.
no V × T term; ``logits_bytes_per_token_chunked`` is the chunked path's growth per token
above the activations' (the naive path's is about 3 × 4 × V bytes). The naive path is
skipped (null) at lengths whose logits would not fit in this machine's free memory.

    .venv/bin/python bench/trainer_memory.py [--quick] [--json PATH]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import _common

VOCAB = 152_064
HIDDEN = 64
PROMPT = 16
LENGTHS = [1024, 2048, 4096, 8192, 16384]
QUICK_LENGTHS = [1024, 2048, 4096]
CHUNK = 1024


def _child(path: str, length: int) -> None:
    """Runs one pass and prints its peak memory over the baseline (bytes) as JSON."""
    import torch
    from rlfleet.trainer.batching import TrainSample, collate
    from rlfleet.trainer.logprobs import _full_logits_logprobs, response_logprobs
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=PROMPT + length + 8, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (PROMPT + length,)).tolist()
    sample = TrainSample("s", "g", tuple(ids[:PROMPT]), tuple(ids[PROMPT:]), (0.0,) * length, 0.0)
    batch = collate([sample], torch.zeros(1), [0], pad_id=0)
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
        f.write("5")
    start = time.perf_counter()
    if path == "activations":
        hidden = model.get_decoder()(input_ids=batch.input_ids, use_cache=False)
        hidden.last_hidden_state.sum().backward()
    elif path == "naive":
        _full_logits_logprobs(model, batch, temperature=1.0).logp.sum().backward()
    else:
        response_logprobs(model, batch, temperature=1.0, chunk_tokens=CHUNK).logp.sum().backward()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    print(json.dumps({"peak_bytes": max(0, peak - before), "seconds": seconds}))


def _status(field: str) -> int:
    """A size from /proc/self/status, in bytes (VmRSS: now; VmHWM: the peak since reset)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _run(path: str, length: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", path, str(length)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(_common.REPO_ROOT / "services")},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares growth per token."""
    n = len(lengths)
    mx, my = sum(lengths) / n, sum(values) / n
    num = sum((x - mx) * (y - my) for x, y in zip(lengths, values, strict=True))
    return num / sum((x - mx) ** 2 for x in lengths)


def main() -> None:
    args = _common.parser(__doc__.splitlines()[0]).parse_args()
    started = time.monotonic()
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    free = _free_bytes()
    rows, naive, chunked, acts = [], [], [], []
    for length in lengths:
        # The naive pass holds the logits, their float copy and the log-softmax (and
        # grads of the same size): keep it well inside the free memory.
        naive_fits = 5 * length * VOCAB * 4 < 0.6 * free
        n = _run("naive", length) if naive_fits else None
        c, a = _run("chunked", length), _run("activations", length)
        naive.append(n["peak_bytes"] if n else None)
        chunked.append(c["peak_bytes"])
        acts.append(a["peak_bytes"])
        rows.append([length, f"{n['peak_bytes'] / 2**20:,.0f}" if n else "skipped (no room)",
                     f"{c['peak_bytes'] / 2**20:,.0f}", f"{a['peak_bytes'] / 2**20:,.0f}",
                     f"{c['seconds']:.1f}"])  # fmt: skip
        print(f"  length {length}: naive {naive[-1]}, chunked {chunked[-1]}, "
              f"activations {acts[-1]} bytes", flush=True)  # fmt: skip
    print(_common.table(["tokens", "naive MiB", "chunked MiB", "activations MiB", "chunked s"],
                        rows, title=f"peak memory of one forward + backward, V = {VOCAB:,}"))  # fmt: skip
    chunk_slope, act_slope = _slope(lengths, chunked), _slope(lengths, acts)
    per_token = max(0.0, chunk_slope - act_slope)
    measured_naive = [(x, y) for x, y in zip(lengths, naive, strict=True) if y is not None]
    naive_slope = (
        _slope([x for x, _ in measured_naive], [y for _, y in measured_naive])
        if len(measured_naive) > 1 else None
    )  # fmt: skip
    # No V × T term: the chunked growth per token above the activations' is a small
    # fraction of one fp32 vocabulary row (4 V bytes), where the naive path's is several.
    met = per_token < 0.25 * 4 * VOCAB
    print(f"growth per token: chunked {chunk_slope:,.0f} B, activations {act_slope:,.0f} B, "
          f"naive {naive_slope:,.0f} B" if naive_slope else "naive: fewer than two lengths fit")  # fmt: skip
    print(f"target (chunked adds no V x T term: < {0.25 * 4 * VOCAB:,.0f} B/token above the "
          f"activations): {'met' if met else 'MISSED'} ({per_token:,.0f} B/token)")  # fmt: skip
    payload = _common.report(
        "trainer_memory", quick=args.quick, started=started,
        vocab=VOCAB, lengths=lengths, peak_bytes_naive=naive, peak_bytes_chunked=chunked,
        peak_bytes_activations=acts, logits_bytes_per_token_chunked=per_token,
        logits_bytes_per_token_naive=(naive_slope - act_slope) if naive_slope else None,
        chunk_tokens=CHUNK, target_met=met,
    )  # fmt: skip
    _common.write_json(args.json, payload)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
