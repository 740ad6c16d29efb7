"""Code that runs inside vLLM's workers: our log-prob convention and in-place weight loads.

vLLM mixes ``RolloutWorkerExtension`` into its worker class (``worker_extension_cls``)
so ``collective_rpc("rlfleet_...")`` reaches every tensor-parallel rank, in this
process or in worker processes alike.

Log-probs: rlfleet records ``log_softmax(logits / T)`` at the sampled token, with
no top-p/top-k truncation, the convention of the torch engine and the trainer.
vLLM's ``logprobs_mode="processed_logprobs"`` gives exactly that when no
truncation is applied (greedy rows use T = 1), but renormalises over the nucleus
when top_p < 1. ``rlfleet_prepare`` therefore makes the sampler hand back the
temperature-scaled log-probs taken just before truncation. It knows the sampler of
vLLM's V1 model runner (the engine asks for that runner); on any other it reports
that top_p < 1 cannot be served with our convention and the engine refuses such
requests.

This module imports only torch at call time: it is imported by vLLM's worker
setup, never by the rest of rlfleet.
"""

from __future__ import annotations

from collections.abc import Iterable


def _wrap_v1(sampler) -> bool:
    """V1 runner: ``Sampler.topk_topp_sampler`` truncates, then samples; it gets the
    temperature-scaled logits, so their log_softmax taken first is our convention."""
    import torch

    inner = sampler.topk_topp_sampler
    if getattr(inner, "_rlfleet_wrapped", False):
        return True
    forward = inner.forward
    inner.logprobs_mode = "raw_logprobs"  # its own (truncated) copy would be discarded

    def forward_untruncated(logits: torch.Tensor, generators, k, p):
        # Taken before truncation, which may edit ``logits`` in place.
        logprobs = logits.log_softmax(dim=-1, dtype=torch.float32)
        sampled, _ = forward(logits, generators, k, p)
        return sampled, logprobs

    inner.forward = forward_untruncated
    inner._rlfleet_wrapped = True
    return True


class RolloutWorkerExtension:
    """Methods vLLM adds to each worker; called by name through ``collective_rpc``."""

    def rlfleet_prepare(self) -> bool:
        """Installs the untruncated log-prob convention; False when this vLLM is unknown."""
        sampler = getattr(self.model_runner, "sampler", None)
        if sampler is None or not hasattr(sampler, "topk_topp_sampler"):
            return False
        return _wrap_v1(sampler)

    def rlfleet_load_weights(self, weights: Iterable) -> None:
        """Copies checkpoint-format (HF-named) tensors into the live model, in place."""
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        _refresh_cpu_packs(self.model_runner.model)
        _refresh_cpu_moe_packs(self.model_runner.model)


def _refresh_cpu_packs(model) -> None:
    """Re-packs the CPU GEMM copies of layers that keep their weight (embeddings, lm_head).

    On CPU, vLLM packs every linear weight into a kernel-specific copy after loading.
    Layers that drop their plain weight get re-packed by the layerwise reload, but a
    tied lm_head receives no tensor of its own in a checkpoint, so its packed copy
    would keep serving the old embedding: measured here as logits off by > 1.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        method = getattr(module, "quant_method", None)
        if (
            hasattr(module, "cpu_linear")
            and method is not None
            and weight is not None
            and weight.ndim == 2
            and weight.numel() > 0
        ):
            method.process_weights_after_loading(module)


def _refresh_cpu_moe_packs(model) -> None:
    """Re-packs the experts of MoE layers that run on vLLM's CPU MoE kernel.

    Their ``process_weights_after_loading`` pads and pre-packs w13/w2 into the kernel's
    layout on the first load only; an in-place reload leaves the new expert weights
    unpacked (measured: log-probs off by ~0.35). A version always carries every expert
    weight, so after each reload they are in checkpoint layout and are packed once here.
    """
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        experts = getattr(getattr(method, "moe_kernel", None), "fused_experts", None)
        if experts is None or not hasattr(module, "w13_weight"):
            continue
        if type(experts).__module__.rsplit(".", 1)[-1] == "cpu_moe":
            experts.process_weights_after_loading(module)
