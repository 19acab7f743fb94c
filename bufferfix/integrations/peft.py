"""PEFT: values its tuners compute deterministically where no constructor replay reaches them.

Tuner models and tuner layers take the base model (or base layer) as a constructor argument, so
bufferfix never replays them.  Three kinds of their values are nonetheless deterministic, and a
model built or loaded on meta gets them back through recompute functions registered here:

* projections drawn from a seeded generator in a tuner model's ``_pre_injection_hook`` and kept in
  :class:`BufferDict`\\ s (VeRA / RandLoRA / PVeRA ... with ``save_projection=False``: non-persistent,
  in no checkpoint): when a tuner is made on a meta model, ``inject_adapter`` is wrapped to re-run
  the hook on CPU first, against a stand-in that keeps its writes (the live tuner is untouched and
  the values are PEFT's own), and those values are kept until materialisation asks for them;
* ``PeftModel.prompt_tokens`` (prompt learning: ``arange(num_virtual_tokens * submodules)``);
* FourierFT's and WaveFT's ``indices`` (a ``randperm`` from ``random_loc_seed``'s own generator);
* UniLoRA's seeded indices and scales, which it moves to the base layer's device (meta) itself:
  kept as snapshots when it does (in ``update_scaling`` when it computes them, and in
  ``_move_adapter_to_device_of_base_layer`` when ``PeftModel.from_pretrained(...,
  low_cpu_mem_usage=True)`` moves them back to a meta base after its ``load_state_dict(assign=True)``
  gave them their values).

OSF's, PSOFT's and TrainableTokens' buffers are computed from the base layer's pretrained weight when
the adapter is made (an SVD, a copy of embedding rows): on a meta base nothing can give them, and they
are declared unrecoverable with :attr:`~bufferfix.recovery.Reason.FROM_PRETRAINED_WEIGHT`.
"""
from __future__ import annotations

import inspect
import logging
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..recovery import Reason
from .base import Integration, Recompute, Unrecoverable, Wrap, Wrapped, WrapperArgs, WrapperKwargs, contained

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from peft.tuners._buffer_dict import BufferDict
    from peft.tuners.tuners_utils import BaseTuner
    from peft.tuners.unilora.layer import UniLoraLayer

    from ..mechanism.snapshots import MoveToMeta

logger = logging.getLogger("bufferfix")

# id(BufferDict) -> (weakref to it, {adapter name: its value as a normal build computes it})
_projections: dict[int, tuple[weakref.ref[BufferDict], dict[str, torch.Tensor]]] = {}

# Tuner layers whose buffers (under these attributes) are computed from the base layer's pretrained weight
FROM_PRETRAINED_WEIGHT = (
    ("peft.tuners.osf.layer", "OSFLayer",
     ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high")),
    ("peft.tuners.psoft.layer", "PsoftLayer", ("_psoft_A_cache", "_psoft_B_cache")),
    ("peft.tuners.trainable_tokens.layer", "TrainableTokensLayer", ("trainable_tokens_original",)),
)


class _StandIn:
    """The tuner model while its ``_pre_injection_hook`` re-runs: reads go to the tuner, methods are
    bound to the stand-in, attribute writes stay here."""

    def __init__(self, real: BaseTuner) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "_written", {})

    def __getattr__(self, name: str) -> Any:  # whatever the tuner's attribute is
        written = object.__getattribute__(self, "_written")
        if name in written:
            return written[name]
        real = object.__getattribute__(self, "_real")
        function = inspect.getattr_static(type(real), name, None)
        if isinstance(function, types.FunctionType):  # a plain method: bound to the stand-in
            return types.MethodType(function, self)
        return getattr(real, name)  # attributes, static and class methods, properties: the tuner's

    def __setattr__(self, name: str, value: object) -> None:
        object.__getattribute__(self, "_written")[name] = value


def _inject_adapter(wrapped: Wrapped, instance: BaseTuner, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    if INTEGRATION.active:  # BaseTuner.__init__ has just run _pre_injection_hook; nothing is injected yet
        contained(lambda: _remember_projections(instance), "noting PEFT's projections")
    return wrapped(*args, **kwargs)


def _on_meta(tuner: BaseTuner) -> bool:
    from peft.tuners._buffer_dict import BufferDict

    if any(parameter.is_meta for parameter in tuner.model.parameters()):
        return True
    return any(tensor.is_meta for module in tuner._modules.values() if isinstance(module, BufferDict)
               for tensor in module.values())


def _remember_projections(tuner: BaseTuner) -> None:
    """On a model on meta (or whose projections are), compute the projections the hook would give
    on CPU now, while the model is as the hook saw it (VeRA's ``_find_dim`` needs the layers not yet
    replaced by tuner layers), and keep them until the BufferDict dies or is materialised."""
    import torch
    from peft.tuners._buffer_dict import BufferDict

    for key in [key for key, (held, _) in _projections.items() if held() is None]:
        del _projections[key]
    held = {attribute: module for attribute, module in tuner._modules.items() if isinstance(module, BufferDict)}
    if not held or not _on_meta(tuner):
        return
    values: dict[str, dict[str, torch.Tensor]] = {attribute: {} for attribute in held}
    for adapter, config in tuner.peft_config.items():
        if not any(adapter in module for module in held.values()):
            continue
        stand_in = _StandIn(tuner)
        with torch.random.fork_rng(devices=[]), torch.device("cpu"), torch.no_grad():
            # the stand-in takes the tuner's place (duck-typed): it is the point
            type(tuner)._pre_injection_hook(stand_in, tuner.model, config, adapter)  # type: ignore[arg-type]
        written = object.__getattribute__(stand_in, "_written")
        for attribute in held:
            made = written.get(attribute)
            if isinstance(made, BufferDict) and adapter in made:
                values[attribute][adapter] = made[adapter]
    for attribute, module in held.items():
        _projections[id(module)] = (weakref.ref(module), values[attribute])


def _recompute_projections(buffer_dict: BufferDict) -> dict[str, torch.Tensor]:
    """``{adapter name: tensor}`` for a BufferDict a tuner's ``_pre_injection_hook`` filled."""
    entry = _projections.get(id(buffer_dict))
    if entry is None or entry[0]() is not buffer_dict:
        return {}
    return dict(entry[1])


# instance: a UniLoRA layer, a torch.nn.Module that is also peft's UniLoraLayer (no one class says both)
def _update_scaling(wrapped: Wrapped, instance: Any, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    """UniLoRA assigns its seeded indices and scales after injection, then moves them to the base
    layer's device itself (tensor ``.to``): on a meta base, the values it moved are kept as snapshots."""
    from ..mechanism import snapshots

    if not INTEGRATION.active:
        return wrapped(*args, **kwargs)
    move = contained(lambda: snapshots.MoveToMeta(instance), "snapshotting UniLoRA's indices")
    result = wrapped(*args, **kwargs)
    if move is not None:
        contained(lambda: _keep_moved_scales(instance, move, *args, **kwargs), "snapshotting UniLoRA's scales")
    return result


def _move_adapter(wrapped: Wrapped, instance: torch.nn.Module, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    """UniLoRA moves its indices and scales to the base layer's device with tensor ``.to``: real ones
    it moves to meta are kept as snapshots."""
    from ..mechanism import snapshots

    if not INTEGRATION.active:
        return wrapped(*args, **kwargs)
    move = contained(lambda: snapshots.MoveToMeta(instance), "snapshotting UniLoRA's buffers")
    result = wrapped(*args, **kwargs)
    if move is not None:
        contained(move.after, "snapshotting UniLoRA's buffers")
    return result


def _keep_moved_scales(layer: UniLoraLayer, move: MoveToMeta, adapter_name: str, unilora_scales_A: object,
                       unilora_scales_B: object) -> None:
    import torch

    from ..mechanism import snapshots

    move.after()  # the indices: real before the call, moved to meta by it
    for held, value in ((layer.unilora_scales_A, unilora_scales_A), (layer.unilora_scales_B, unilora_scales_B)):
        live = held[adapter_name] if adapter_name in held else None
        if isinstance(live, torch.Tensor) and isinstance(value, torch.Tensor):
            snapshots.remember(live, value)


def _recompute_prompt_tokens(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    import torch

    # Any: the prompt-learning configs the condition keeps have fields that PeftConfig lacks
    configs: dict[str, Any] = peft_model.peft_config
    return {"prompt_tokens[%r]" % name: torch.arange(config.num_virtual_tokens * config.num_transformer_submodules).long()
            for name, config in configs.items()
            if getattr(config, "is_prompt_learning", False) and getattr(config, "num_transformer_submodules", None)}


def _seeded_indices(indices: str, seeds: str, counts: str) -> Callable[[Any], dict[str, torch.Tensor]]:
    """FourierFT's / WaveFT's ``indices``: ``randperm`` from each adapter's own seeded generator,
    as (row, column) pairs (what their ``update_layer`` computes)."""
    def recompute(layer: Any) -> dict[str, torch.Tensor]:  # a FourierFTLayer or WaveFTLayer, read by name
        import torch

        found = {}
        for adapter, seed in getattr(layer, seeds).items():
            drawn = torch.randperm(layer.out_features * layer.in_features,
                                   generator=torch.Generator().manual_seed(seed))[:getattr(layer, counts)[adapter]]
            found["%s[%r]" % (indices, adapter)] = torch.stack([drawn // layer.in_features, drawn % layer.in_features])
        return found

    return recompute


class Peft(Integration):
    name = "peft"
    target = "peft"

    declarations = (
        Recompute("peft.tuners._buffer_dict", "BufferDict", _recompute_projections),
        Recompute("peft.peft_model", "PeftModel", _recompute_prompt_tokens),
        Recompute("peft.tuners.fourierft.layer", "FourierFTLayer",
                  _seeded_indices("indices", "fourierft_random_loc_seed", "fourierft_n_frequency")),
        Recompute("peft.tuners.waveft.layer", "WaveFTLayer",
                  _seeded_indices("waveft_indices", "waveft_random_loc_seed", "waveft_n_frequency")),
        *(Unrecoverable(where, dotted, attributes, Reason.FROM_PRETRAINED_WEIGHT)
          for where, dotted, attributes in FROM_PRETRAINED_WEIGHT),
        Wrap("peft.tuners.tuners_utils", "BaseTuner.inject_adapter", _inject_adapter),
        Wrap("peft.tuners.unilora.layer", "UniLoraLayer.update_scaling", _update_scaling),
        Wrap("peft.tuners.unilora.layer", "UniLoraLayer._move_adapter_to_device_of_base_layer", _move_adapter),
    )


INTEGRATION = Peft()
