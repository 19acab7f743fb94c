"""bufferfix's warning and error classes, strict mode, and warnings attributed to the user's line.

The words of a message are made in :mod:`bufferfix.reporting`; the classes carry the
:class:`~bufferfix.mechanism.recovery.Recovery` values they are about as ``.recoveries``.
"""
import os
import sys
import warnings

from .activation import settings


class BufferFixWarning(UserWarning):
    """Base class of every warning bufferfix emits."""


class UnrecoverableBufferWarning(BufferFixWarning):
    """A non-persistent buffer was materialised but its value could not be recovered.

    ``recoveries``: a tuple of :class:`~bufferfix.mechanism.recovery.Recovery`, one per buffer."""

    def __init__(self, message, recoveries=()):
        super().__init__(message)
        self.recoveries = tuple(recoveries)


class UnrecoverableBufferError(RuntimeError):
    """Strict mode: raised instead of :class:`UnrecoverableBufferWarning` (same ``recoveries``)."""

    def __init__(self, message, recoveries=()):
        super().__init__(message)
        self.recoveries = tuple(recoveries)


_strict = None  # None: follow BUFFERFIX_STRICT


def set_strict(strict: "bool | None") -> None:
    """``True``: unrecoverable buffers raise; ``False``: they warn; ``None``: follow the env var."""
    global _strict
    _strict = strict


def is_strict() -> bool:
    return settings.flag(settings.STRICT) if _strict is None else bool(_strict)


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.sep + "wrapt" + os.sep,
             os.path.join("torch", "nn", "modules", "module.py"))


def warn(message, category=BufferFixWarning):
    """``warnings.warn`` attributed to the user's line, not to bufferfix or wrapt internals.
    ``message`` may be a warning instance (its class is then the category)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is our caller
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
