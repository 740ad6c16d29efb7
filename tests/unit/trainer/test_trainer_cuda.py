"""The trainer's GPU paths (scripts/gpu_check.sh runs these on a machine with one GPU;
elsewhere they skip, which CI expects for `gpu` tests without CUDA):

- FSDP2 over NCCL with one rank: the sharded update equals the plain one on the GPU, and
  so does the CPU-offloaded one (shards and the AdamW step in host memory);
- bf16 compute over fp32 master weights keeps updates that bf16 masters lose;
- chunked log-probs on CUDA: the full-logits numbers, in a fraction of the memory.
"""

from __future__ import annotations

import pytest
import torch
from rlfleet.common.jobspec import JobSpec
from rlfleet.trainer.batching import TrainSample, micro_batches
from rlfleet.trainer.grpo import grpo_update
from rlfleet.trainer.logprobs import _full_logits_logprobs, response_logprobs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def _lm(*, vocab: int = 64, hidden: int = 32, dtype=torch.float32) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         pad_token_id=0, max_position_embeddings=8192)  # fmt: skip
    return LlamaForCausalLM(config).to(dtype).to(CUDA).eval()


def _samples(n: int = 8) -> list[TrainSample]:
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        completion = tuple(torch.randint(1, 64, (3 + i % 3,), generator=g).tolist())
        out.append(TrainSample(f"s{i}", f"g{i // 4}", (1, 2, 3), completion,
                               (-4.0,) * len(completion), float(i % 2)))  # fmt: skip
    return out


def _spec(**extra) -> JobSpec:
    return JobSpec.model_validate({"model": {"path": "unused", **extra.pop("model", {})},
                                   "correction": {"kind": "none"},
                                   "algorithm": {"group_size": 4, "prompts_per_step": 2,
                                                 "lr": 1e-3, **extra}})  # fmt: skip


def test_fsdp2_over_nccl_with_one_rank_equals_the_plain_update(tmp_path):
    import torch.distributed as dist
    from rlfleet.common.procs import free_port
    from rlfleet.trainer.distributed import shard_model

    plain = _lm()
    out_plain = grpo_update(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3), _samples(),
                            spec=_spec(), step=0, device=CUDA, pad_id=0)  # fmt: skip
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)  # fmt: skip
    try:
        root = shard_model(_lm())
        out = grpo_update(root, torch.optim.AdamW(root.parameters(), lr=1e-3), _samples(),
                          spec=_spec(), step=0, device=CUDA, pad_id=0)  # fmt: skip
        assert out["loss"] == pytest.approx(out_plain["loss"], abs=1e-4)
        sharded = dict(root.lm.named_parameters())
        for name, a in plain.named_parameters():
            assert torch.allclose(a, sharded[name].full_tensor(), atol=1e-4), name
    finally:
        dist.destroy_process_group()


def test_cpu_offload_over_nccl_equals_the_plain_update():
    import torch.distributed as dist
    from rlfleet.common.procs import free_port
    from rlfleet.trainer.distributed import shard_model

    plain = _lm()
    out_plain = grpo_update(plain, torch.optim.AdamW(plain.parameters(), lr=1e-3), _samples(),
                            spec=_spec(), step=0, device=CUDA, pad_id=0)  # fmt: skip
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1)  # fmt: skip
    try:
        root = shard_model(_lm().cpu(), cpu_offload=True)  # built in host memory
        out = grpo_update(root, torch.optim.AdamW(root.parameters(), lr=1e-3), _samples(),
                          spec=_spec(), step=0, device=CUDA, pad_id=0)  # fmt: skip
        assert out["loss"] == pytest.approx(out_plain["loss"], abs=1e-4)
        sharded = dict(root.lm.named_parameters())
        assert all(p.device.type == "cpu" for p in sharded.values())  # they stay on the host
        for name, a in plain.named_parameters():
            assert torch.allclose(a.cpu(), sharded[name].full_tensor().cpu(), atol=1e-4), name
    finally:
        dist.destroy_process_group()


def test_bf16_compute_over_fp32_masters_on_cuda_keeps_small_updates():
    moved = {}
    for master in ("float32", "bfloat16"):
        model = _lm(dtype=getattr(torch, master))
        before = [p.detach().clone() for p in model.parameters()]
        spec = _spec(lr=2e-6, model={"dtype": "bfloat16", "master_dtype": master})
        opt = torch.optim.AdamW(model.parameters(), lr=2e-6, weight_decay=0.0)
        grpo_update(model, opt, _samples(), spec=spec, step=0, device=CUDA, pad_id=0)
        changed = sum(int((p != b).sum()) for p, b in zip(model.parameters(), before, strict=True))
        moved[master] = changed / sum(b.numel() for b in before)
    assert moved["float32"] > 0.9 and moved["bfloat16"] < 0.1


def test_chunked_logprobs_on_cuda_equal_full_logits_in_a_fraction_of_the_memory():
    model = _lm(vocab=152_064, hidden=64)
    g = torch.Generator().manual_seed(3)
    completion = tuple(torch.randint(1, 152_064, (4096,), generator=g).tolist())
    sample = TrainSample("s", "g", (1, 2, 3), completion, (0.0,) * len(completion), 0.0)
    [mb] = micro_batches([sample], torch.zeros(1), size=1, pad_id=0)
    mb = mb.to(CUDA)
    peaks, values = {}, {}
    for path in ("full", "chunked"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        if path == "full":
            logp = _full_logits_logprobs(model, mb, temperature=1.0).logp
        else:
            logp = response_logprobs(model, mb, temperature=1.0, chunk_tokens=1024).logp
        logp.sum().backward()
        peaks[path] = torch.cuda.max_memory_allocated() - base
        values[path] = logp.detach()
        model.zero_grad(set_to_none=True)
    assert torch.allclose(values["chunked"], values["full"], atol=1e-3)
    assert peaks["chunked"] < peaks["full"] / 3, peaks
