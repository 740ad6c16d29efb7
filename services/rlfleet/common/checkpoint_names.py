"""A model's weights under the names of its published checkpoint format, and back.

transformers 5 keeps some architectures in memory under other names and shapes than
their checkpoints on the Hub: a MoE's experts are one fused tensor per layer
(Qwen2/Qwen3-MoE and the many families mapped onto them, Mixtral and MiniMax, ...):

    in memory (transformers >= 5)            published checkpoint (Hub, vLLM's loader)
    mlp.experts.gate_up_proj   [E, 2I, H]    mlp.experts.{e}.gate_proj.weight  [I, H]
                                             mlp.experts.{e}.up_proj.weight    [I, H]
    mlp.experts.down_proj      [E, H, I]     mlp.experts.{e}.down_proj.weight  [H, I]
    (Mixtral also renames .block_sparse_moe. -> .mlp., and w1/w3/w2 are gate/up/down)

The rules are transformers' own: ``conversion_mapping.py`` registers, per model type,
the ``WeightRenaming``/``WeightConverter`` transforms that ``from_pretrained`` applies
when it loads a checkpoint; the loaded model keeps the ones it used as
``model._weight_conversions``, and ``save_pretrained`` writes the checkpoint format by
reversing them with ``transformers.core_model_loading.revert_weight_conversion``.

``to_checkpoint_names`` calls that very function (what ``save_pretrained`` writes is
what rlfleet publishes); ``to_model_names`` runs the same transforms forward, through
the same ``rename_source_key`` and converter ``convert`` calls as ``from_pretrained``.
Nothing here names an architecture: a family transformers knows how to convert is
converted, any other passes through unchanged, and with transformers < 5 (no
``core_model_loading``: memory and checkpoint names are the same) both are identities.

``model`` is the causal LM (a ``PreTrainedModel``, also when FSDP2 wraps it) or only
its config (a tensor-free model is then built on the meta device). The tensors are
what the caller passes, on any device; the converted ones are views of them where the
rule allows (per-expert ``down_proj``), new tensors otherwise (``gate_proj``/``up_proj``
are cut from ``gate_up_proj`` and made contiguous).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Mapping
from copy import deepcopy
from typing import Any

import torch


def _core():
    """transformers' conversion machinery, or None where it has none (transformers < 5)."""
    try:
        from transformers import core_model_loading
    except ImportError:
        return None
    needed = ("revert_weight_conversion", "rename_source_key", "WeightConverter", "WeightRenaming")
    return core_model_loading if all(hasattr(core_model_loading, n) for n in needed) else None


def names_model(model_or_config: Any):
    """The model (as given) or, for a config, a tensor-free model built from it."""
    from transformers import PretrainedConfig

    if isinstance(model_or_config, PretrainedConfig):
        cls = type(model_or_config)
        return _meta_model(cls, model_or_config.to_json_string(use_diff=False))
    return model_or_config


@functools.lru_cache(maxsize=8)
def _meta_model(config_cls: type, config_json: str):
    import json

    from transformers import AutoModelForCausalLM

    config = config_cls.from_dict(json.loads(config_json))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def conversions(model_or_config: Any) -> list:
    """transformers' load-time transforms (checkpoint -> memory) for this model: the ones
    ``from_pretrained`` used (``_weight_conversions``), else the registered default for
    its type; [] when there are none.

    One difference from ``revert_weight_conversion``'s own choice: a model loaded from
    a directory already in memory layout (e.g. ``save_pretrained(...,
    save_original_format=False)``, or a checkpoint a trainer wrote without conversion)
    used no transform, and save_pretrained would write it back in memory layout; here
    it still gets its family's default, so what is published is always the Hub format."""
    core = _core()
    if core is None:
        return []
    model = names_model(model_or_config)
    used = getattr(model, "_weight_conversions", None)
    if used:
        return list(used)
    from transformers.conversion_mapping import get_model_conversion_mapping

    found = get_model_conversion_mapping(model, add_legacy=False)
    prefix_change = getattr(core, "PrefixChange", None)
    return [c for c in found if prefix_change is None or not isinstance(c, prefix_change)]


def converts(model_or_config: Any) -> bool:
    """Whether this model's in-memory names differ from its checkpoint's at all."""
    return bool(conversions(model_or_config))


def to_checkpoint_names(
    model_or_config: Any, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` (in-memory names, e.g. ``PolicyEngine.weights()``) under the published
    checkpoint's names, as ``save_pretrained`` writes them. Keeps every key it is given,
    tied ones included. A subset converts on its own as long as it holds whole fused
    tensors (each converts alone in this direction)."""
    core = _core()
    if core is None or not converts(model_or_config):
        return dict(state)
    model = names_model(model_or_config)
    if not getattr(model, "_weight_conversions", None):
        # revert_weight_conversion takes the model's recorded transforms whenever it has
        # the attribute (even []); hand it this module's choice (``conversions``) instead.
        return dict(_revert_with(core, model, conversions(model), state))
    return dict(core.revert_weight_conversion(model, dict(state)))


class _WithTransforms:
    """``model`` seen with ``transforms`` as the ones it recorded (nothing is changed on
    the model itself, which other threads may be using)."""

    def __init__(self, model: Any, transforms: list):
        self._model = model
        self._weight_conversions = transforms

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


def _revert_with(core, model, transforms: list, state: Mapping[str, torch.Tensor]):
    """``revert_weight_conversion`` with ``transforms`` as the model's recorded ones."""
    return core.revert_weight_conversion(_WithTransforms(model, transforms), dict(state))


def to_model_names(
    model_or_config: Any, state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state`` (checkpoint names, e.g. a published version) under the names and shapes
    of the model in memory, as ``from_pretrained`` converts them, so a live transformers
    model takes it with ``load_state_dict``. Fused tensors need all their parts."""
    core = _core()
    transforms = conversions(model_or_config) if core is not None else []
    if not transforms:
        return dict(state)
    model = names_model(model_or_config)
    renamings = [t for t in transforms if isinstance(t, core.WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, core.WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, Any] = {}
    # Natural order (experts 0, 1, ..., 10), the order the converters stack them in.
    for key, tensor in sorted(state.items(), key=lambda kv: core.dot_natural_key(kv[0])):
        renamed, pattern = core.rename_source_key(key, renamings, converters)
        if pattern is not None:
            mapping = pending.setdefault(renamed, deepcopy(by_pattern[pattern]))
        else:
            mapping = pending.setdefault(renamed, core.WeightRenaming(key, renamed))
            pattern = key
        mapping.add_tensor(renamed, key, pattern, tensor)
    out: dict[str, torch.Tensor] = {}
    for first, mapping in pending.items():
        for name, tensor in mapping.convert(first, model=model, config=model.config).items():
            out[name] = tensor[0] if isinstance(tensor, list) else tensor
    return out


def _meta_checkpoint(model_or_config: Any) -> dict[str, torch.Tensor]:
    """The checkpoint-named state of this model as meta tensors (no memory, no copy);
    tensors the model ties together stay one object, as renaming keeps them."""
    model = names_model(model_or_config)
    meta: dict[int, torch.Tensor] = {}

    def as_meta(t: torch.Tensor) -> torch.Tensor:
        return meta.setdefault(id(t), torch.empty(tuple(t.shape), dtype=t.dtype, device="meta"))

    state = {name: as_meta(p) for name, p in model.named_parameters(remove_duplicate=False)}
    for name, t in model.state_dict().items():  # persistent buffers: each its own
        state.setdefault(name, torch.empty(tuple(t.shape), dtype=t.dtype, device="meta"))
    return to_checkpoint_names(model, state)


def checkpoint_specs(model_or_config: Any) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every tensor the published checkpoint of this model
    holds (tied ones included), from names and shapes alone: no weight is read or
    copied (meta tensors), so a payload can be laid out before any is gathered."""
    return {n: (tuple(t.shape), t.dtype) for n, t in _meta_checkpoint(model_or_config).items()}


def checkpoint_tie_groups(model_or_config: Any) -> dict[str, int]:
    """Checkpoint name -> group id; names in one group are one tensor in the model (a
    tied LM head and the embeddings), so a version may carry any one of them."""
    groups: dict[int, int] = {}
    return {
        name: groups.setdefault(id(t), len(groups))
        for name, t in _meta_checkpoint(model_or_config).items()
    }


_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def checkpoint_sources(model_or_config: Any) -> dict[str, tuple[str, ...]]:
    """Checkpoint name -> the in-memory names its tensor is made from (e.g. every
    ``mlp.experts.{e}.up_proj.weight`` of a layer -> that layer's
    ``mlp.experts.gate_up_proj``; a renamed or unchanged tensor -> its one name), from
    metadata alone; cached per model. A tensor whose conversion needs several
    in-memory tensors at once (none of the families rlfleet tests) maps to all of them."""
    model = names_model(model_or_config)
    try:
        return _SOURCES[model]
    except (KeyError, TypeError):
        pass
    full = _meta_checkpoint(model)
    sources: dict[str, tuple[str, ...]] = {}
    inseparable: list[str] = []
    for name, t in model.state_dict().items():
        meta = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
        try:
            alone = to_checkpoint_names(model, {name: meta})
        except Exception:  # noqa: BLE001 - a conversion that needs its partners
            alone = None
        fits = alone is not None and all(
            n in full and tuple(v.shape) == tuple(full[n].shape) for n, v in alone.items()
        )
        if not fits:
            inseparable.append(name)
            continue
        for out in alone:
            sources[out] = (name,)
    for out in full:
        sources.setdefault(out, tuple(inseparable))
    try:
        _SOURCES[model] = sources
    except TypeError:  # not weak-referenceable: not cached
        pass
    return sources


def gather_in_checkpoint_names(
    model: Any,
    names: list[str],
    gather: Callable[[list[str]], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The tensors of the checkpoint ``names`` (e.g. a bucket of a payload laid out from
    ``checkpoint_specs``), given ``gather``, which returns whole tensors by in-memory
    name (``PolicyEngine.gather``). Every rank calls it with the same ``names`` (so the
    same gathers run everywhere); where ``gather`` returns nothing (ranks other than 0)
    so does this."""
    sources = checkpoint_sources(model)
    needed = list(dict.fromkeys(src for name in names for src in sources[name]))
    whole = gather(needed)
    if not whole:
        return {}
    converted = to_checkpoint_names(model, whole)
    return {name: converted[name] for name in names}
