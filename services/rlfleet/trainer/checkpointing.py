"""Activation checkpointing (``algorithm.activation_checkpointing``): each decoder layer
keeps only its input during the forward pass and recomputes its activations in the
backward, trading one more forward of compute for layer-count-times-smaller
activation memory.

transformers' own switch (``gradient_checkpointing_enable``) acts only in training
mode, and the trainer runs its policy in eval mode (no dropout: the θ and θ_old
passes must see one function), so the layers are wrapped here instead, the same way
whatever the architecture: every module in the body's ``layers`` list.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The body's list of decoder layers (``model.layers`` of Llama, Qwen, Mistral, ...)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(
            f"{type(model).__name__} has no list of decoder layers to checkpoint "
            "(algorithm.activation_checkpointing)"
        )
    return layers


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Wraps every decoder layer's forward in ``torch.utils.checkpoint`` (when gradients are
    on); returns how many layers were wrapped."""
    layers = decoder_layers(model)
    for layer in layers:
        forward = layer.forward

        @functools.wraps(forward)
        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
    return len(layers)
