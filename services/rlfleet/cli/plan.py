"""`rlfleet plan`: does a job fit a cluster? Memory per trainer rank and per rollout GPU,
from the model's config.json alone (the model is built on PyTorch's meta device to
count its parameters exactly: no weights are read, any architecture transformers
knows works; one it does not know is refused by name).

Formulas (bytes; P parameters, R trainer ranks, m master bytes per value (4 for fp32),
c compute bytes (2 for bf16), T tokens per micro-batch, L layers, H hidden size,
I the MLP width a token passes through (dense: intermediate_size; MoE: experts per
token × the expert width), kv = KV heads × head dim, V vocabulary):

trainer, per rank (FSDP2 shards states over R; ``trainer/distributed.py``)
  parameters      P·m / R
  gradients       P·m / R
  AdamW moments   2·P·4 / R
  gathered layers 2 · (largest layer's parameters) · c   (the one computing + prefetch)
  reference model P·c / R                              (only when kl_coef > 0)
  activations     T · L · (6H + 2kv + 4I) · c           (what autograd keeps per layer:
                  norm inputs, q/k/v, attention and MLP inputs and outputs)
                  with activation checkpointing: T·L·H·c + T·(6H + 2kv + 4I)·c
  attention       0 with flash attention (GPUs); ``--attention eager`` (CPU, eager):
                  sequences · heads · S² · 4 per layer kept (3 layers' worth with checkpointing)
  log-probs       4 · chunk · V · 4                     (trainer/logprobs.py: a chunk's
                  fp32 logits and temporaries; bench/trainer_memory.py measured 4.0×)

Checked against CPU: tests/unit/common/test_plan.py measures one update's peak memory
(RSS over the process's baseline: gradients, AdamW state, activations, attention scores,
log-probs) and compares it with these parts (``--attention eager``).
rollout, per GPU (tensor parallel size t; replicas = rollout GPUs / t)
  weights         P·c / t
  KV cache        S / replicas · 2·L·kv·c · (prompt + max_new_tokens) / t
                  S = sequences in flight: C3PO++'s pool Ω, else the step's samples

A part fits when its total is at most ``--headroom`` (default 0.9) of a GPU's memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelFacts:
    architecture: str
    params: int
    largest_layer_params: int
    layers: int
    hidden: int
    mlp_width: int
    kv_dim: int
    vocab: int
    heads: int


def model_facts(path: str | Path) -> ModelFacts:
    """What the formulas need, from a model directory or its config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ValueError(f"{path} is neither a model directory nor a config.json")
    raw = json.loads(config_file.read_text())
    try:
        config = AutoConfig.for_model(**raw) if "model_type" in raw else None
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"plan does not know the architecture {raw.get('model_type')!r} "
            f"(transformers cannot build it: {exc})"
        ) from None
    if config is None:
        raise ValueError(f"{config_file} names no model_type; plan cannot tell the architecture")
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise ValueError(
                f"plan does not know the architecture {raw['model_type']!r} as a causal LM: {exc}"
            ) from None
    layers = model.get_decoder().layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    experts = getattr(config, "num_experts_per_tok", 0) or 0
    width = config.intermediate_size
    if experts and getattr(config, "moe_intermediate_size", None):
        width = experts * config.moe_intermediate_size
    elif experts:
        width = experts * config.intermediate_size
    return ModelFacts(
        architecture=type(model).__name__,
        params=sum(p.numel() for p in model.parameters()),
        largest_layer_params=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
        layers=len(layers),
        hidden=config.hidden_size,
        mlp_width=width,
        kv_dim=kv * head_dim,
        vocab=config.vocab_size,
        heads=heads,
    )


# Trainer parts that are not GPU memory: a count, and what CPU offload keeps on the host.
NOT_ON_GPU = ("micro_batch_tokens", "host_offload")


def trainer_parts(facts: ModelFacts, spec, *, ranks: int, prompt_tokens: int,
                  attention: str = "flash") -> dict[str, int]:  # fmt: skip
    alg, model = spec.algorithm, spec.model
    m, c = DTYPE_BYTES[model.master_dtype], DTYPE_BYTES[model.dtype]
    p = facts.params
    tokens = alg.max_tokens_per_micro_batch or alg.micro_batch_size * (
        prompt_tokens + spec.sampling.max_new_tokens
    )
    per_layer = (6 * facts.hidden + 2 * facts.kv_dim + 4 * facts.mlp_width) * c
    if alg.activation_checkpointing:
        activations = tokens * facts.layers * facts.hidden * c + tokens * per_layer
    else:
        activations = tokens * facts.layers * per_layer
    # Attention that materialises its scores (eager, or SDPA's math path on CPU) keeps
    # heads × S² fp32 values per sequence and layer; flash attention keeps none.
    seq = prompt_tokens + spec.sampling.max_new_tokens
    scores = 0
    if attention == "eager":
        per_layer_scores = max(1, tokens // seq) * facts.heads * seq * seq * 4
        scores = per_layer_scores * (3 if alg.activation_checkpointing else facts.layers)
    parts = {
        "parameters": p * m // ranks,
        "gradients": p * m // ranks,
        "optimizer": 2 * p * 4 // ranks,
        "gathered_layers": 2 * facts.largest_layer_params * c,
        "reference_model": p * c // ranks if alg.kl_coef > 0 else 0,
        "activations": activations,
        "attention_scores": scores,
        "logprobs": 4 * min(alg.logprob_chunk_tokens, tokens) * facts.vocab * 4,
    }
    if alg.cpu_offload:  # FSDP2 keeps these in host memory; a layer visits the GPU
        host = sum(parts.pop(k) for k in ("parameters", "gradients", "optimizer"))
        parts.update(parameters=0, gradients=0, optimizer=0)
        parts["host_offload"] = host
    parts["micro_batch_tokens"] = tokens
    return parts


def rollout_parts(facts: ModelFacts, spec, *, gpus: int, tp: int, prompt_tokens: int) -> dict:
    c = DTYPE_BYTES[spec.model.dtype]
    sched = spec.scheduling
    sequences = (
        (sched.pool_capacity or 2 * spec.samples_per_step)
        if sched.mode == "c3po"
        else spec.samples_per_step
    )
    replicas = max(1, gpus // tp)
    per_sequence = (
        2 * facts.layers * facts.kv_dim * c * (prompt_tokens + spec.sampling.max_new_tokens)
    )
    return {
        "weights": facts.params * c // tp,
        "kv_cache": math.ceil(sequences / replicas) * per_sequence // tp,
        "replicas": replicas,
        "sequences_per_replica": math.ceil(sequences / replicas),
    }


def plan(facts: ModelFacts, spec, *, nodes: int, gpus_per_node: int, gpu_memory_gib: float,
         trainer_gpus: int = 0, rollout_tp: int = 1, prompt_tokens: int = 512,
         headroom: float = 0.9, attention: str = "flash") -> dict[str, Any]:  # fmt: skip
    """The whole verdict, as ``rlfleet plan --json`` prints it."""
    total_gpus = nodes * gpus_per_node
    trainer_gpus = trainer_gpus or max(1, total_gpus // 2)
    if trainer_gpus >= total_gpus and total_gpus > 1:
        raise ValueError(f"--trainer-gpus {trainer_gpus} leaves no GPU of {total_gpus} for rollout")
    rollout_gpus = max(1, total_gpus - trainer_gpus)
    if rollout_gpus % rollout_tp:
        raise ValueError(
            f"--rollout-tp {rollout_tp} does not divide the {rollout_gpus} rollout GPUs"
        )
    budget = headroom * gpu_memory_gib * GIB
    trainer = trainer_parts(facts, spec, ranks=trainer_gpus, prompt_tokens=prompt_tokens,
                            attention=attention)  # fmt: skip
    t_total = sum(v for k, v in trainer.items() if k not in NOT_ON_GPU)
    rollout = rollout_parts(
        facts, spec, gpus=rollout_gpus, tp=rollout_tp, prompt_tokens=prompt_tokens
    )
    r_total = rollout["weights"] + rollout["kv_cache"]
    suggestions = _suggest(facts, spec, trainer, t_total, rollout, r_total, budget=budget,
                           trainer_gpus=trainer_gpus, rollout_gpus=rollout_gpus, tp=rollout_tp)  # fmt: skip
    return {
        "model": asdict(facts),
        "cluster": {
            "nodes": nodes,
            "gpus_per_node": gpus_per_node,
            "gpu_memory_bytes": int(gpu_memory_gib * GIB),
            "headroom": headroom,
        },  # fmt: skip
        "trainer": {
            "ranks": trainer_gpus,
            "per_rank_bytes": t_total,
            "parts": trainer,
            "fits": t_total <= budget,
        },  # fmt: skip
        "rollout": {
            "gpus": rollout_gpus,
            "tensor_parallel_size": rollout_tp,
            "per_gpu_bytes": r_total,
            "parts": rollout,
            "fits": r_total <= budget,
        },  # fmt: skip
        "fits": t_total <= budget and r_total <= budget,
        "suggestions": suggestions,
    }


def _suggest(facts, spec, trainer, t_total, rollout, r_total, *, budget, trainer_gpus,
             rollout_gpus, tp) -> list[str]:  # fmt: skip
    out = []
    if t_total > budget:
        sharded = trainer["parameters"] + trainer["gradients"] + trainer["optimizer"]
        sharded += trainer["reference_model"]
        rest = t_total - sharded
        if rest < budget:
            need = math.ceil(sharded * trainer_gpus / (budget - rest))
            out.append(f"trainer: shard over at least {need} ranks (now {trainer_gpus})")
        if not spec.algorithm.cpu_offload:
            out.append("trainer: set algorithm.cpu_offload = true (moves "
                       f"{(sharded - trainer['reference_model']) / GIB:.1f} GiB per rank of "
                       "parameters, gradients and AdamW state to host memory)")  # fmt: skip
        if not spec.algorithm.activation_checkpointing:
            out.append("trainer: set algorithm.activation_checkpointing = true (activations "
                       f"{trainer['activations'] / GIB:.1f} GiB per micro-batch)")  # fmt: skip
        out.append("trainer: lower algorithm.max_tokens_per_micro_batch (now "
                   f"{trainer['micro_batch_tokens']} tokens per micro-batch)")  # fmt: skip
    if r_total > budget:
        if rollout["weights"] > budget / 2 and tp * 2 <= rollout_gpus:
            out.append(f"rollout: a tensor-parallel size of {tp * 2} or more (weights "
                       f"{rollout['weights'] / GIB:.1f} GiB per GPU at {tp})")  # fmt: skip
        out.append("rollout: fewer sequences in flight (scheduling.pool_capacity, or "
                   "prompts_per_step × group_size)")  # fmt: skip
    return out


def render(result: dict[str, Any]) -> str:
    """The verdict for people: the parts in GiB, then what to change."""

    def gib(v: int) -> str:
        return f"{v / GIB:8.2f} GiB"

    t, r, cl = result["trainer"], result["rollout"], result["cluster"]
    budget = cl["headroom"] * cl["gpu_memory_bytes"]
    lines = [f"model: {result['model']['architecture']}, {result['model']['params'] / 1e9:.2f} B "
             f"parameters; cluster: {cl['nodes']} x {cl['gpus_per_node']} GPUs of "
             f"{cl['gpu_memory_bytes'] / GIB:.0f} GiB (budget {budget / GIB:.1f} GiB each)",
             f"trainer, per rank ({t['ranks']} ranks, {t['parts']['micro_batch_tokens']} tokens "
             "per micro-batch):"]  # fmt: skip
    lines += [f"  {k:<16}{gib(v)}" for k, v in t["parts"].items() if k not in NOT_ON_GPU]
    if "host_offload" in t["parts"]:
        lines.append(f"  (host memory: {gib(t['parts']['host_offload'])} offloaded per rank)")
    lines.append(
        f"  {'total':<16}{gib(t['per_rank_bytes'])}  {'fits' if t['fits'] else 'DOES NOT FIT'}"
    )
    lines.append(f"rollout, per GPU ({r['gpus']} GPUs, tensor parallel {r['tensor_parallel_size']}, "
                 f"{r['parts']['sequences_per_replica']} sequences per replica):")  # fmt: skip
    lines += [f"  {k:<16}{gib(r['parts'][k])}" for k in ("weights", "kv_cache")]
    lines.append(
        f"  {'total':<16}{gib(r['per_gpu_bytes'])}  {'fits' if r['fits'] else 'DOES NOT FIT'}"
    )
    lines.append("verdict: the job fits" if result["fits"] else "verdict: the job does not fit")
    lines += [f"  - {s}" for s in result["suggestions"]]
    return "\n".join(lines)
