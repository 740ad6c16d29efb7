"""Several trainer ranks: FSDP2 sharding and the collectives a step needs.

Each rank holds a shard of every parameter, gradient and AdamW moment
(``fully_shard`` on each decoder layer, then on the root); a layer's full weights
exist only while it computes. NCCL on GPUs, gloo on CPU: the same code.

How a step is split (``grpo.py``, ``sft.py``): every rank gets the whole step's
samples (token ids: small next to the model), computes the same advantages and the
same shuffled update parts, then trains on its share of each part (every world-th
sample). Each rank's loss is normalised by the part's *global* sample count and
scaled by the world size before the backward, because FSDP2 averages gradients over
ranks (a divide factor of 1 would need PREMUL_SUM, which gloo lacks): the mean of
world × rank gradients is their sum, and the update equals the one-rank update on the
same batch. FSDP2 runs collectives in every forward and
backward, so all ranks must run the same number of micro-batches: a rank with fewer
repeats one with its loss weighted 0 (``matched``). Step metrics are sums or
gathers over ranks.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, rows: Sequence[T]) -> list[T]:
        """This rank's share of a part: every world-th item from its rank."""
        return list(rows[self.rank :: self.world])


def ranks() -> Ranks:
    """This process's place in the default process group (one rank when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_process_group(*, backend: str = "", init_method: str = "env://", rank: int | None = None,
                       world_size: int | None = None) -> Ranks:  # fmt: skip
    """Joins the trainer's process group: NCCL when CUDA is there, else gloo."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return ranks()


def join_alone() -> None:
    """A process group of one (this process), for FSDP2 on a single rank (CPU offload)."""
    from rlfleet.common.procs import free_port

    if not dist.is_initialized():
        init_process_group(init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def shard_model(
    model: torch.nn.Module,
    *,
    compute_dtype: torch.dtype | None = None,
    cpu_offload: bool = False,
) -> torch.nn.Module:
    """FSDP2: each decoder layer, then the root, a ``LogprobHead`` around the model (every
    use of the weights runs in its forward). Returns that root; train and publish
    through it. With ``compute_dtype`` below the parameters' dtype, layers compute in it
    and gradients are reduced in fp32. ``cpu_offload``: shards, gradients and the
    optimizer step stay in host memory (pinned when there is a GPU)."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        OffloadPolicy,
        fully_shard,
    )

    from rlfleet.trainer.checkpointing import decoder_layers
    from rlfleet.trainer.logprobs import LogprobHead

    master = next(model.parameters()).dtype
    policy = MixedPrecisionPolicy()
    if compute_dtype is not None and compute_dtype != master:
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    offload = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else None
    options = {"mp_policy": policy, "offload_policy": offload or OffloadPolicy()}
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    root = LogprobHead(model)
    fully_shard(root, **options)
    return root


def sum_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """Σ over ranks of each value (one all-reduce)."""
    if ranks().world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist(), strict=True))


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if ranks().world == 1:
        return [obj]
    out: list[Any] = [None] * ranks().world
    dist.all_gather_object(out, obj)
    return out


def most_over_ranks(value: int) -> int:
    if ranks().world == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def matched(batches: list[T], *, filler: T) -> list[tuple[T, float]]:
    """(micro-batch, loss weight) pairs, as many on every rank: the longest rank's count,
    shorter ones made up with ``filler`` at weight 0 (FSDP2's collectives need every
    rank in every forward and backward)."""
    count = most_over_ranks(len(batches))
    return [(b, 1.0) for b in batches] + [(filler, 0.0)] * (count - len(batches))


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor over sharded gradients)."""
    full = getattr(norm, "full_tensor", None)
    return float(full() if full is not None else norm)
