"""transformers: ``from_pretrained``'s own materialisation.

transformers 5 builds every model under ``torch.device("meta")`` and then, in
``PreTrainedModel._move_missing_keys_from_meta_to_device``, replaces every
non-persistent buffer with ``torch.empty_like``, trusting each model's
``_init_weights`` to refill it.  Custom / remote-code models whose ``_init_weights``
does not know their buffers keep garbage (transformers issue 48892).  Wrapping
that method restores the buffers right after it; ``_init_weights`` still runs
afterwards and rewrites the buffers it knows, as in a normal build, so the result
is what ``Model(config)`` would hold.

transformers 4.x keeps buffers real while loading (``init_empty_weights`` without
buffers), so it has no such entry point; its meta flows go through
``Module.to_empty`` / ``Module.to``, which the torch integration covers.
"""
import logging

import wrapt

from ._patching import materialising

logger = logging.getLogger("bufferfix")

_TARGET = ("transformers.modeling_utils", "PreTrainedModel._move_missing_keys_from_meta_to_device")
_handle = None


def _move_missing_keys_from_meta_to_device(wrapped, instance, args, kwargs):
    return materialising(lambda: wrapped(*args, **kwargs), instance)


def instrument(modeling_utils):
    global _handle
    if _handle is not None:
        return
    if not hasattr(modeling_utils.PreTrainedModel, "_move_missing_keys_from_meta_to_device"):
        version = getattr(__import__("transformers"), "__version__", "?")
        logger.info("bufferfix: transformers %s has no PreTrainedModel._move_missing_keys_from_meta_to_device; "
                    "from_pretrained keeps buffers real there, nothing to patch", version)
        return
    _handle = wrapt.wrap_function_wrapper(modeling_utils, _TARGET[1], _move_missing_keys_from_meta_to_device)
    logger.debug("bufferfix: transformers instrumented")


def uninstrument():
    global _handle
    if _handle is None:
        return
    import sys

    wrapt.unwrap_object(sys.modules[_TARGET[0]], _TARGET[1], _handle, missing_ok=True)
    _handle = None
