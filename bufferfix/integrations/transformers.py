"""transformers: ``from_pretrained``'s own materialisation.

transformers 5 builds every model under ``torch.device("meta")``; in
``PreTrainedModel._finalize_model_loading`` it then

1. ``_move_missing_keys_from_meta_to_device``: replaces every non-persistent
   buffer with ``torch.empty_like``, trusting each model's ``_init_weights`` to
   refill it;
2. ``_initialize_missing_keys``: runs ``_init_weights``, which recomputes the
   buffers of transformers' own models, and leaves those of custom / remote-code
   models whose ``_init_weights`` does not know them as garbage (transformers
   issue 48892).

bufferfix plans around 1 and fills every buffer after it, except those only a
constructor replay can fill: these wait until 2 has run (see
``materialise.DeferredRestore``).  A buffer ``_init_weights`` overwrites is left
to it, one it reads first is filled before it reads it, the rest are filled
after it, so the result is what ``Model(config)`` would hold and transformers'
own models cost no replay.  Without all three entry points (other 5.x
versions), everything is filled right after 1.

transformers 4.x keeps buffers real while loading (``init_empty_weights``
without buffers), so it has no such entry point; its meta flows go through
``Module.to_empty`` / ``Module.to``, which the torch integration covers.
"""
from __future__ import annotations

import logging
import threading
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .base import (
    Integration,
    Overwriting,
    Restoring,
    Wrap,
    Wrapped,
    WrapperArgs,
    WrapperKwargs,
    contained,
    loading_ended,
    report,
)

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedModel

    from ..mechanism.deferral import DeferredRestore

logger = logging.getLogger("bufferfix")

_MOVE = "PreTrainedModel._move_missing_keys_from_meta_to_device"
_INITIALISE = "PreTrainedModel._initialize_missing_keys"
_FINALISE = "PreTrainedModel._finalize_model_loading"
_local = threading.local()  # id(model) -> DeferredRestore, for the load running in this thread


def _pending() -> dict[int, DeferredRestore]:
    if not hasattr(_local, "pending"):
        _local.pending = {}
    return _local.pending


def _move_missing_keys_from_meta_to_device(wrapped: Wrapped, instance: PreTrainedModel, args: WrapperArgs,
                                           kwargs: WrapperKwargs) -> Any:
    if not INTEGRATION.active:
        return wrapped(*args, **kwargs)
    restoring = Restoring(instance, defer_replays=INTEGRATION.deferring)
    with restoring:
        result = wrapped(*args, **kwargs)
    if restoring.deferred is not None:
        _pending()[id(instance)] = restoring.deferred
    return result


def _initialize_missing_keys(wrapped: Wrapped, instance: PreTrainedModel, args: WrapperArgs,
                             kwargs: WrapperKwargs) -> Any:
    deferred = _pending().get(id(instance))
    if deferred is None:
        return wrapped(*args, **kwargs)
    watching = contained(deferred.watching, "watching the initialisation")
    try:
        if watching is None:
            return wrapped(*args, **kwargs)
        with watching:
            return wrapped(*args, **kwargs)
    finally:  # also when _init_weights raised: nothing stays held back
        _finish(instance)


def _finalize_model_loading(wrapped: Wrapped, instance: PreTrainedModel, args: WrapperArgs,
                            kwargs: WrapperKwargs) -> Any:
    """The outer boundary: whatever is still held back when loading ends is filled now."""
    model = args[0] if args else kwargs.get("model")
    try:
        return wrapped(*args, **kwargs)
    finally:
        if model is not None:
            _finish(model)


def _finish(model: nn.Module) -> None:
    deferred = _pending().pop(id(model), None)
    if deferred is not None:
        def finish() -> None:
            deferred.finish()
            report(deferred.plan, ())

        contained(finish, "restoring non-persistent buffers")
    contained(loading_ended, "giving the verdicts when loading ends")


class Transformers(Integration):
    name = "transformers"
    target = "transformers.modeling_utils"
    declarations = (
        Wrap(target, _MOVE, _move_missing_keys_from_meta_to_device),  # 4.x has none of the three
        Wrap(target, _INITIALISE, _initialize_missing_keys),
        Wrap(target, _FINALISE, _finalize_model_loading),
        # swapped in for torch.nn.init's while _init_weights runs; they skip tensors marked initialised
        Overwriting("transformers.initialization",
                    ("normal_", "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_", "copy_")),
    )

    def __init__(self) -> None:
        super().__init__()
        self.deferring = False  # all three entry points exist

    def _instrument(self, modeling_utils: ModuleType) -> None:
        self.deferring = all(_has(modeling_utils, dotted) for dotted in (_MOVE, _INITIALISE, _FINALISE))
        logger.debug("bufferfix: transformers: replays deferred past _init_weights: %s", self.deferring)

    def _uninstrument(self) -> None:
        self.deferring = False


def _has(module: ModuleType, dotted: str) -> bool:
    owner, _, name = dotted.partition(".")
    return hasattr(getattr(module, owner, None), name)


INTEGRATION = Transformers()
