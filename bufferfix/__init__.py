"""bufferfix: non-persistent buffers survive meta-device materialisation.

``import bufferfix`` is all a program needs: torch is patched as soon as it is
imported (now, if it already is), never imported by bufferfix itself.
``BUFFERFIX_DISABLE=1`` turns every form of activation off, this one included.
"""
import importlib
import logging
import sys

from . import _env
from .errors import (
    BufferFixWarning,
    UnrecoverableBufferError,
    UnrecoverableBufferWarning,
    is_strict,
    set_strict,
)

__version__ = "0.1.0"
__all__ = [
    "BufferFixWarning", "UnrecoverableBufferError", "UnrecoverableBufferWarning",
    "disable", "enable", "is_enabled", "is_strict", "never_replay", "register_recompute", "set_strict",
]

logger = logging.getLogger("bufferfix")
_env.configure_logging()  # BUFFERFIX_LOG_LEVEL
_enabled = False
_hooks_registered = False

# library module -> the bufferfix integration that patches it, once that module is imported
_INTEGRATIONS = {
    "torch": "torch_nn",
    "transformers.modeling_utils": "transformers",
    "accelerate": "accelerate",
}


def _post_import_hook(integration):
    def instrument(module):
        """Runs inside the user's import: it must never make that import fail."""
        if not _enabled:
            return
        try:
            importlib.import_module("bufferfix.integrations." + integration).instrument(module)
        except Exception:  # noqa: BLE001
            logger.exception("bufferfix: could not instrument %s; its buffers will not be restored", module.__name__)

    return instrument


def enable():
    """Patch torch now if it is imported, else as soon as it is.  Returns whether bufferfix is on."""
    global _enabled, _hooks_registered
    if _env.flag(_env.DISABLE):
        logger.info("bufferfix: %s is set; not patching anything", _env.DISABLE)
        return False
    _enabled = True
    if not _hooks_registered:
        import wrapt  # only now: it costs ~150 ms and a disabled bufferfix must not pay it

        for module, integration in _INTEGRATIONS.items():  # runs at once for modules already imported
            wrapt.register_post_import_hook(_post_import_hook(integration), module)
        _hooks_registered = True
    else:
        for module, integration in _INTEGRATIONS.items():
            if module in sys.modules:
                _post_import_hook(integration)(sys.modules[module])
    return True


def disable():
    """Remove every patch bufferfix installed (recorded state is kept but unused)."""
    global _enabled
    _enabled = False
    for integration in reversed(list(_INTEGRATIONS.values())):
        patched = sys.modules.get("bufferfix.integrations." + integration)
        if patched is not None:
            patched.uninstrument()


def is_enabled():
    return _enabled


def register_recompute(cls, fn=None):
    """See :func:`bufferfix.mechanism.recipes.register_recompute` (imports torch)."""
    from .mechanism import recipes

    return recipes.register_recompute(cls, fn)


def never_replay(cls):
    """See :func:`bufferfix.mechanism.recipes.never_replay` (imports torch)."""
    from .mechanism import recipes

    return recipes.never_replay(cls)


enable()
