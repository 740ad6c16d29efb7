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
the few tokens IcePop masks: ``ResponseLogprobs.distribution`` computes it for those
rows from the gathered hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812
from torch.utils.checkpoint import checkpoint

from rlfleet.trainer.batching import MicroBatch

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
    """The response log-probs of a micro-batch, and a way back to whole distributions."""

    logp: Tensor
    """[B, T] fp32: log π(y_t | prefix), 0 on padding."""
    head: torch.nn.Module | None = None
    hidden: Tensor | None = None
    """[B, T, H], detached: the body's output at the positions that score the response."""
    logp_all: Tensor | None = None
    """[B, T, V]: the full-logits path keeps them anyway."""
    temperature: float = 1.0

    def distribution(self, where: Tensor) -> Tensor:
        """log_softmax over the vocabulary at the positions ``where`` ([B, T] bool) → [n, V],
        without gradient; for the few tokens a metric needs."""
        if self.logp_all is not None:
            return self.logp_all.detach()[where]
        with torch.no_grad():
            return torch.log_softmax(self.head(self.hidden[where]).float() / self.temperature, -1)


def response_logprobs(
    model: torch.nn.Module,
    batch: MicroBatch,
    *,
    temperature: float,
    chunk_tokens: int = 1024,
    compute_dtype: torch.dtype | None = None,
) -> ResponseLogprobs:
    """log π(y_t | prefix) at every response position (the module docstring says how).

    ``compute_dtype`` (e.g. bfloat16 over fp32 weights) runs the forward under autocast;
    the backward then follows the dtypes the forward chose, and the log-probs come back
    in fp32 either way."""
    if compute_dtype is None or compute_dtype == next(model.parameters()).dtype:
        return _response_logprobs(model, batch, temperature=temperature, chunk_tokens=chunk_tokens)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type=device_type, dtype=compute_dtype):
        return _response_logprobs(model, batch, temperature=temperature, chunk_tokens=chunk_tokens)


def _response_logprobs(
    model: torch.nn.Module, batch: MicroBatch, *, temperature: float, chunk_tokens: int
) -> ResponseLogprobs:
    if not chunkable(model):
        return _full_logits_logprobs(model, batch, temperature=temperature)
    out = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    )
    hidden = out.last_hidden_state  # [B, L, H]
    index = batch.score_positions.unsqueeze(-1).expand(-1, -1, hidden.size(-1))
    at_scores = torch.gather(hidden, 1, index)  # [B, T, H]: the logit rows that are needed
    head = model.get_output_embeddings()
    flat = token_logprobs(
        head,
        at_scores[batch.valid],
        batch.completion_ids[batch.valid],
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )
    logp = torch.zeros(batch.valid.shape, dtype=torch.float32, device=flat.device)
    logp = logp.masked_scatter(batch.valid, flat)
    return ResponseLogprobs(logp, head=head, hidden=at_scores.detach(), temperature=temperature)


def _full_logits_logprobs(
    model: torch.nn.Module, batch: MicroBatch, *, temperature: float
) -> ResponseLogprobs:
    """The plain path: the model's own logits, gathered at the response positions."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
    ).logits  # [B, L, V]
    index = batch.score_positions.unsqueeze(-1).expand(-1, -1, logits.size(-1))
    logp_all = torch.log_softmax(torch.gather(logits, 1, index).float() / temperature, dim=-1)
    logp = torch.gather(logp_all, -1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(batch.valid, logp, torch.zeros_like(logp))
    return ResponseLogprobs(logp, logp_all=logp_all, temperature=temperature)
