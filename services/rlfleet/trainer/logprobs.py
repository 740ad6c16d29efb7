"""Log-probs of the sampled tokens without a [tokens × vocabulary] tensor.

A causal LM's forward returns logits for every position: B × L × V values, 2 MB per
token at a 152K vocabulary in fp32, before the float copy and the log-softmax that
training adds. Only the response positions are needed, and of each only the
sampled token's log-prob:

    log π(y_t | prefix) = z_t[y_t] − logsumexp_v z_t[v],   z_t = (W h_t + b) / T

So the body of the model runs alone (``get_decoder()``, hidden states B × L × H), the
hidden states at the response positions are gathered (N × H for N response tokens),
and the head is applied ``chunk_tokens`` rows at a time. Each chunk's logits live only
inside that chunk: under autograd the chunk is checkpointed
(``torch.utils.checkpoint``), so backward recomputes its logits instead of keeping
them, and peak memory has no V × T term: chunk × V plus the activations.

Models whose head is not a plain projection (final-logit soft-capping, a logit
scale) or whose body cannot be reached take the full-logits path, which gives the
same numbers. The IcePop entropy metric needs the whole distribution, but only at
the few tokens IcePop masks: with ``entropy_band`` the pass computes it at those rows
from the gathered hidden states, inside the forward (where a sharded head is whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812
from torch.utils.checkpoint import checkpoint

from rlfleet.trainer.batching import MicroBatch
from rlfleet.trainer.losses import icepop_band, token_entropy, train_inference_ratio

# Config attributes of heads that are more than W h + b (Gemma 2's soft-capping,
# Cohere's logit scale): such models take the full-logits path.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def chunkable(model: torch.nn.Module) -> bool:
    """Whether the model's logits are its output embedding applied to its body's output."""
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 0, 1, 1.0) for name in _HEAD_EXTRAS):
        return False
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    return decoder is not None and decoder is not model and isinstance(head, torch.nn.Linear)


def _chunk_logprobs(weight: Tensor, bias: Tensor | None, hidden: Tensor, targets: Tensor,
                    inv_temperature: float) -> Tensor:  # fmt: skip
    """z[y] − logsumexp(z) for one chunk of rows, z = (W h + b) / T in fp32."""
    logits = F.linear(hidden, weight, bias).float() * inv_temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logprobs(head: torch.nn.Linear, hidden: Tensor, targets: Tensor, *,
                   temperature: float, chunk_tokens: int) -> Tensor:  # fmt: skip
    """log π(target) for each row of ``hidden`` ([N, H]) → [N] fp32, ``chunk_tokens`` at a time."""
    inv = 1.0 / temperature
    track = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    parts = []
    for start in range(0, hidden.size(0), chunk_tokens):
        args = (head.weight, head.bias, hidden[start : start + chunk_tokens],
                targets[start : start + chunk_tokens], inv)  # fmt: skip
        if track:  # backward recomputes the chunk's logits instead of keeping them
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(*args))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


@dataclass
class ResponseLogprobs:
    logp: Tensor
    """[B, T] fp32: log π(y_t | prefix), 0 on padding."""
    entropy: Tensor | None = None
    """[B, T]: H(π) at the tokens outside ``entropy_band`` (0 elsewhere), when asked."""


class LogprobHead(torch.nn.Module):
    """A causal LM whose forward returns response log-probs instead of logits.

    Everything that touches the weights runs inside this module's forward, so when the
    trainer is sharded this is the FSDP2 root (``distributed.shard_model``): its hooks
    gather the embedding, final norm and head, and reduce their gradients."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: MicroBatch, *, temperature: float, chunk_tokens: int,
                entropy_band: tuple[float, float] | None) -> ResponseLogprobs:  # fmt: skip
        if not chunkable(self.lm):
            return _full_logits_logprobs(self.lm, batch, temperature=temperature,
                                         entropy_band=entropy_band)  # fmt: skip
        out = self.lm.get_decoder()(**_inputs(batch))
        hidden = out.last_hidden_state  # [R, L, H]
        at_scores = _at_scores(hidden, batch)  # [B, T, H]: the logit rows that are needed
        head = self.lm.get_output_embeddings()
        flat = token_logprobs(
            head,
            at_scores[batch.valid],
            batch.completion_ids[batch.valid],
            temperature=temperature,
            chunk_tokens=chunk_tokens,
        )
        logp = torch.zeros(batch.valid.shape, dtype=torch.float32, device=flat.device)
        logp = logp.masked_scatter(batch.valid, flat)
        entropy = None
        if entropy_band is not None:
            where = _outside(logp.detach(), batch, entropy_band)
            entropy = torch.zeros_like(logp)
            if bool(where.any()):
                with torch.no_grad():
                    rows = torch.log_softmax(head(at_scores[where]).float() / temperature, -1)
                entropy[where] = token_entropy(rows)
        return ResponseLogprobs(logp, entropy)


def _inputs(batch: MicroBatch) -> dict:
    """The model's inputs: padded rows with their mask, or one packed row with position ids
    (transformers keeps attention within each sequence of a packed row)."""
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
            "position_ids": batch.position_ids, "use_cache": False}  # fmt: skip


def _at_scores(states: Tensor, batch: MicroBatch) -> Tensor:
    """[R, L, X] per-position states → [B, T, X] at the positions scoring the responses."""
    return states.reshape(-1, states.size(-1))[batch.score_index]


def _outside(logp: Tensor, batch: MicroBatch, band: tuple[float, float]) -> Tensor:
    """Response tokens whose k = p_train / p_infer falls outside [α, β] (IcePop masks them)."""
    k = train_inference_ratio(logp, batch.logp_infer)
    return batch.valid & ~icepop_band(k, alpha=band[0], beta=band[1])


def response_logprobs(
    model: torch.nn.Module,
    batch: MicroBatch,
    *,
    temperature: float,
    chunk_tokens: int = 1024,
    compute_dtype: torch.dtype | None = None,
    entropy_band: tuple[float, float] | None = None,
) -> ResponseLogprobs:
    """log π(y_t | prefix) at every response position (the module docstring says how).

    ``model``: a causal LM, or a ``LogprobHead`` around one (the sharded trainer's root).
    ``compute_dtype`` (e.g. bfloat16 over fp32 weights) runs the forward under autocast;
    the backward follows the dtypes the forward chose, and the log-probs come back in
    fp32 either way. ``entropy_band`` (α, β): also the entropy at the tokens IcePop
    masks, computed from the whole distribution at those few tokens only."""
    runner = model if isinstance(model, LogprobHead) else LogprobHead(model)
    kwargs = {
        "temperature": temperature,
        "chunk_tokens": chunk_tokens,
        "entropy_band": entropy_band,
    }
    params = next(model.parameters())
    if compute_dtype is None or compute_dtype == params.dtype:
        return runner(batch, **kwargs)
    with torch.autocast(device_type=params.device.type, dtype=compute_dtype):
        return runner(batch, **kwargs)


def _full_logits_logprobs(
    model: torch.nn.Module,
    batch: MicroBatch,
    *,
    temperature: float,
    entropy_band: tuple[float, float] | None = None,
) -> ResponseLogprobs:
    """The plain path: the model's own logits, gathered at the response positions."""
    logits = model(**_inputs(batch)).logits  # [R, L, V]
    logp_all = torch.log_softmax(_at_scores(logits, batch).float() / temperature, dim=-1)
    logp = torch.gather(logp_all, -1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(batch.valid, logp, torch.zeros_like(logp))
    entropy = None
    if entropy_band is not None:
        where = _outside(logp.detach(), batch, entropy_band)
        entropy = torch.zeros_like(logp)
        entropy[where] = token_entropy(logp_all.detach()[where])
    return ResponseLogprobs(logp, entropy)
