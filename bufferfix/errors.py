"""bufferfix's warning and error classes, and warnings attributed to the user's line.

The words of a message are made in :mod:`bufferfix.reporting`; the classes carry the
:class:`~bufferfix.recovery.Recovery` values they are about as ``.recoveries``.
"""
from __future__ import annotations

import os
import sys
import types
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .recovery import Recovery


class BufferFixWarning(UserWarning):
    """Base class of every warning bufferfix emits."""


class UnrecoverableBufferWarning(BufferFixWarning):
    """A non-persistent buffer was materialised but its value could not be recovered.

    ``recoveries``: a tuple of :class:`~bufferfix.recovery.Recovery`, one per buffer."""

    def __init__(self, message: str, recoveries: Iterable[Recovery] = ()) -> None:
        super().__init__(message)
        self.recoveries: tuple[Recovery, ...] = tuple(recoveries)


class UnrecoverableBufferError(RuntimeError):
    """Strict mode: raised instead of :class:`UnrecoverableBufferWarning` (same ``recoveries``)."""

    def __init__(self, message: str, recoveries: Iterable[Recovery] = ()) -> None:
        super().__init__(message)
        self.recoveries: tuple[Recovery, ...] = tuple(recoveries)


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.sep + "wrapt" + os.sep,
             os.path.join("torch", "nn", "modules", "module.py"))


def warn(message: str | Warning, category: type[Warning] = BufferFixWarning) -> None:
    """``warnings.warn`` attributed to the user's line, not to bufferfix or wrapt internals.
    ``message`` may be a warning instance (its class is then the category)."""
    level = 2  # stacklevel 2 is our caller
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None and any(part in frame.f_code.co_filename for part in _INTERNAL):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, category, stacklevel=level)
