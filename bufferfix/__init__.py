"""bufferfix: non-persistent buffers survive meta-device materialisation.

``import bufferfix`` is all a program needs: torch is patched as soon as it is
imported (now, if it already is), never imported by bufferfix itself.
``BUFFERFIX_DISABLE=1`` turns every form of activation off, this one included.
"""
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
_enabled = False
_hook_registered = False


def _instrument_torch(_torch_module=None):
    """Post-import hook for torch: must never make ``import torch`` fail."""
    if not _enabled:
        return
    try:
        from .integrations import torch_nn

        torch_nn.instrument()
    except Exception:  # noqa: BLE001
        logger.exception("bufferfix: could not instrument torch; buffers will not be restored")


def enable():
    """Patch torch now if it is imported, else as soon as it is.  Returns whether bufferfix is on."""
    global _enabled, _hook_registered
    if _env.flag(_env.DISABLE):
        logger.info("bufferfix: %s is set; not patching anything", _env.DISABLE)
        return False
    _enabled = True
    if "torch" in sys.modules:
        _instrument_torch()
    elif not _hook_registered:
        import wrapt  # only now: it costs ~150 ms and a disabled bufferfix must not pay it

        wrapt.register_post_import_hook(_instrument_torch, "torch")
        _hook_registered = True
    return True


def disable():
    """Remove every patch bufferfix installed (recorded state is kept but unused)."""
    global _enabled
    _enabled = False
    integrations = sys.modules.get("bufferfix.integrations.torch_nn")
    if integrations is not None:
        integrations.uninstrument()


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
