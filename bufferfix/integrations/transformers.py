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
import logging
import threading

import wrapt

from ._patching import contained, materialising

logger = logging.getLogger("bufferfix")

_MODULE = "transformers.modeling_utils"
_MOVE = "PreTrainedModel._move_missing_keys_from_meta_to_device"
_INITIALISE = "PreTrainedModel._initialize_missing_keys"
_FINALISE = "PreTrainedModel._finalize_model_loading"
_handles = {}
_deferring = False  # all three entry points exist
_local = threading.local()  # id(model) -> DeferredRestore, for the load running in this thread


def _pending():
    if not hasattr(_local, "pending"):
        _local.pending = {}
    return _local.pending


def _move_missing_keys_from_meta_to_device(wrapped, instance, args, kwargs):
    hold = (lambda deferred: _pending().__setitem__(id(instance), deferred)) if _deferring else None
    return materialising(lambda: wrapped(*args, **kwargs), instance, hold_replays=hold)


def _initialize_missing_keys(wrapped, instance, args, kwargs):
    deferred = _pending().get(id(instance))
    if deferred is None:
        return wrapped(*args, **kwargs)
    watching = contained(deferred.watching, "watching the initialisation")
    if watching is None:
        return wrapped(*args, **kwargs)
    with watching:
        result = wrapped(*args, **kwargs)
    _finish(instance)
    return result


def _finalize_model_loading(wrapped, instance, args, kwargs):
    """The outer boundary: whatever is still held back when loading ends is filled now."""
    model = args[0] if args else kwargs.get("model")
    try:
        return wrapped(*args, **kwargs)
    finally:
        if model is not None and id(model) in _pending():
            _finish(model)


def _finish(model):
    deferred = _pending().pop(id(model), None)
    if deferred is not None:
        contained(deferred.finish, "restoring non-persistent buffers")


def instrument(modeling_utils):
    global _deferring
    if _handles:
        return
    model_class = modeling_utils.PreTrainedModel
    if not hasattr(model_class, "_move_missing_keys_from_meta_to_device"):
        version = getattr(__import__("transformers"), "__version__", "?")
        logger.info("bufferfix: transformers %s has no PreTrainedModel._move_missing_keys_from_meta_to_device; "
                    "from_pretrained keeps buffers real there, nothing to patch", version)
        return
    _handles[_MOVE] = wrapt.wrap_function_wrapper(modeling_utils, _MOVE, _move_missing_keys_from_meta_to_device)
    _deferring = all(hasattr(model_class, name.split(".")[1]) for name in (_INITIALISE, _FINALISE))
    if _deferring:
        _handles[_INITIALISE] = wrapt.wrap_function_wrapper(modeling_utils, _INITIALISE, _initialize_missing_keys)
        _handles[_FINALISE] = wrapt.wrap_function_wrapper(modeling_utils, _FINALISE, _finalize_model_loading)
    logger.debug("bufferfix: transformers instrumented (replays deferred past _init_weights: %s)", _deferring)


def uninstrument():
    global _deferring
    import sys

    for name, handle in list(_handles.items()):
        wrapt.unwrap_object(sys.modules[_MODULE], name, handle, missing_ok=True)
        del _handles[name]
    _deferring = False
