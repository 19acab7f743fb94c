"""What bufferfix tells users when a buffer cannot be brought back."""
import logging
import os
import sys
import warnings

from . import _env

logger = logging.getLogger("bufferfix")


class BufferFixWarning(UserWarning):
    """Base class of every warning bufferfix emits."""


class UnrecoverableBufferWarning(BufferFixWarning):
    """A non-persistent buffer was materialised but its value could not be recovered."""


class UnrecoverableBufferError(RuntimeError):
    """Strict mode: raised instead of :class:`UnrecoverableBufferWarning`."""


_strict = None  # None: follow BUFFERFIX_STRICT


def set_strict(strict):
    """``True``: unrecoverable buffers raise; ``False``: they warn; ``None``: follow the env var."""
    global _strict
    _strict = strict


def is_strict():
    return _env.flag(_env.STRICT) if _strict is None else bool(_strict)


def report_unrecoverable(failures):
    """Warn (or raise in strict mode) about ``[(qualified buffer name, reason), ...]``."""
    if not failures:
        return
    lines = "\n".join("  - %s: %s" % (name, reason) for name, reason in failures)
    message = (
        "bufferfix could not recover %d non-persistent buffer(s) after materialisation; "
        "they hold uninitialised memory:\n%s\n"
        "Fix: build the model normally (not on meta), or register a recompute function "
        "with bufferfix.register_recompute(ModuleClass, fn)." % (len(failures), lines)
    )
    if is_strict():
        raise UnrecoverableBufferError(message)
    warn(message, UnrecoverableBufferWarning)


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.sep + "wrapt" + os.sep,
             os.path.join("torch", "nn", "modules", "module.py"))


def warn(message, category=BufferFixWarning):
    """``warnings.warn`` attributed to the user's line, not to bufferfix or wrapt internals."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is our caller
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
