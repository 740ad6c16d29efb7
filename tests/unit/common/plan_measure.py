"""One trainer update on CPU for test_plan.py: prints its measured peak memory (the peak
resident size during the update, reset just before it, over the resident size then)
beside what `rlfleet plan` predicts for it.

    plan_measure.py MODEL_OUT_DIR TOKENS_PER_SEQUENCE ACTIVATION_CHECKPOINTING(0|1)
"""

from __future__ import annotations

import json
import sys

import torch
from rlfleet.cli.plan import model_facts, trainer_parts
from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.batching import TrainSample
from rlfleet.trainer.engine import PolicyEngine
from transformers import LlamaConfig, LlamaForCausalLM

PARTS = ("gradients", "optimizer", "activations", "attention_scores", "logprobs")


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_now() -> int:
    return _status("VmRSS")


def rss_peak() -> int:
    return _status("VmHWM")


def reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(out: str, tokens: int, checkpointing: bool) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=8192)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(out)
    spec = JobSpec.model_validate({
        "model": {"path": out}, "sampling": {"max_new_tokens": tokens - 16},
        "algorithm": {"group_size": 2, "prompts_per_step": 1, "micro_batch_size": 1,
                      "activation_checkpointing": checkpointing}})  # fmt: skip
    engine = PolicyEngine(spec, torch.device("cpu"))
    engine.load(out)
    g = torch.Generator().manual_seed(1)
    n = tokens - 16
    samples = [TrainSample(f"s{i}", "g0", tuple(range(1, 17)),
                           tuple(torch.randint(1, 32000, (n,), generator=g).tolist()),
                           (-5.0,) * n, float(i)) for i in range(2)]  # fmt: skip
    before = rss_now()
    reset_peak()  # earlier peaks (building, saving, loading the model) must not count
    engine.update(samples, 0)
    measured = rss_peak() - before
    parts = trainer_parts(model_facts(out), spec, ranks=1, prompt_tokens=16, attention="eager")
    print(json.dumps({"measured": measured, "predicted": sum(parts[k] for k in PARTS)}))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
