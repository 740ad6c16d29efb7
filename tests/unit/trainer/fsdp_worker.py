"""One trainer rank for test_trainer_fsdp.py, through the real ``PolicyEngine``: sharded
with FSDP2 over gloo when WORLD_SIZE > 1.

    fsdp_worker.py MODEL_DIR OUT train    two GRPO steps (2 mini-batches × 2 epochs), one SFT
                                          step; saves metrics, the weights after the first
                                          step (whole) and its AdamW state (DCP, every rank
                                          its shards, in OUT.optim/), and the final weights
    fsdp_worker.py MODEL_DIR OUT resume FROM
                                          loads the first step's weights from FROM and its
                                          AdamW state from FROM.optim/ (saved by any rank
                                          count), trains step 1

Rank 0 writes OUT. OFFLOAD=1: ``algorithm.cpu_offload`` (FSDP2 even on one rank)."""

from __future__ import annotations

import os
import sys

import torch
from rlfleet.common.jobspec import JobSpec
from rlfleet.common.weights import PayloadLayout
from rlfleet.trainer import distributed
from rlfleet.trainer.batching import TrainSample, micro_batches
from rlfleet.trainer.engine import PolicyEngine, load_causal_lm
from rlfleet.trainer.logprobs import response_logprobs
from rlfleet.trainer.publish import buckets, gather_payload
from rlfleet.trainer.sft import sft_update

CPU = torch.device("cpu")


def samples(model_dir: str, n: int = 12) -> list[TrainSample]:
    m = load_causal_lm(model_dir, dtype="float32", device=CPU)
    g = torch.Generator().manual_seed(11)
    raw = []
    for i in range(n):
        prompt = tuple(torch.randint(1, 48, (2 + i % 3,), generator=g).tolist())
        completion = tuple(torch.randint(1, 48, (1 + i % 5,), generator=g).tolist())
        raw.append(TrainSample(f"s{i}", f"g{i // 4}", prompt, completion,
                               (0.0,) * len(completion), float((i * 7) % 3)))  # fmt: skip
    [mb] = micro_batches(raw, torch.zeros(n), size=n, pad_id=0)
    with torch.no_grad():  # inference log-probs a little off the model's own
        logp = response_logprobs(m, mb, temperature=1.0).logp - 0.05
    out = [None] * n
    for b, row in enumerate(mb.rows):
        s = raw[row]
        out[row] = TrainSample(s.sample_id, s.group_id, s.prompt_ids, s.completion_ids,
                               tuple(logp[b, : len(s.completion_ids)].tolist()), s.reward)  # fmt: skip
    return out


def main(model_dir: str, out_path: str, mode: str, source: str = "") -> None:
    torch.set_num_threads(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        distributed.init_process_group(backend="gloo")
    main_rank = distributed.ranks().main
    batch = samples(model_dir)
    spec = JobSpec.model_validate({"model": {"path": model_dir}, "steps": 3, "algorithm": {
        "group_size": 4, "prompts_per_step": 3, "mini_batches": 2, "epochs": 2,
        "micro_batch_size": 2, "clip_eps": 0.005, "lr": 1e-2,
        "cpu_offload": os.environ.get("OFFLOAD") == "1"}})  # fmt: skip
    engine = PolicyEngine(spec, CPU)
    torch.manual_seed(0)
    engine.load(model_dir)
    out: dict = {}
    if mode == "train":
        out["metrics"] = [engine.update(batch, 0)]
        out["first"] = {k: v.clone() for k, v in engine.weights().items()}
        engine.save_optimizer(out_path + ".optim")  # staged now, written in the background
        out["metrics"].append(engine.update(batch, 1))
        sft = JobSpec.model_validate({"model": {"path": model_dir}, "steps": 3, "task": {
            "kind": "dataset", "dataset": {"path": "unused.jsonl"}},
            "algorithm": {"kind": "sft", "micro_batch_size": 3}})  # fmt: skip
        out["metrics"].append(sft_update(engine.root, engine.optimizer, batch, spec=sft, step=2,
                                         device=CPU, pad_id=0))  # fmt: skip
    else:  # resume step 1 from the first step's weights and AdamW state
        saved = torch.load(source) if main_rank else {}
        engine.load_weights(saved.get("first"))
        engine.load_optimizer(source + ".optim")
        out["metrics"] = [engine.update(batch, 1)]
    out["state"] = engine.weights()
    # Publishing: the whole weights gathered into one payload a bucket (here ~4 KB) at a
    # time; every rank takes part in each bucket's all-gather, rank 0 fills the payload.
    specs = engine.weight_specs()
    if main_rank:
        out["payload"] = bytes(gather_payload(specs, engine.gather, bytearray, bucket_bytes=4096))
    else:
        for names in buckets(PayloadLayout.of(specs), 4096):
            engine.gather(names)
    engine.wait_saved()
    if main_rank:
        torch.save(out, out_path)
    if distributed.ranks().world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
