"""bufferfix: non-persistent buffers survive meta-device materialisation.

``import bufferfix`` is all a program needs: torch is patched as soon as it is
imported (now, if it already is), never imported by bufferfix itself.
``BUFFERFIX_DISABLE=1`` turns every form of activation off, this one included.

Layout: ``activation/`` (switching on: import, start-up hook, launcher) ->
``integrations/`` (one module per library) -> ``mechanism/`` (recording, recipes and
replay, restore); ``tools/`` (the ``bufferfix`` command) beside them.
"""
import dataclasses
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager

from .activation import registry, settings
from .errors import BufferFixWarning, UnrecoverableBufferError, UnrecoverableBufferWarning
from .recovery import Attempt, Reason, Recovery, Source  # standard library only
from .reporting import is_strict, set_strict

__version__ = "0.2.0"
__all__ = [
    "Attempt", "BufferFixWarning", "Held", "Reason", "Recovery", "Source", "UnrecoverableBufferError",
    "UnrecoverableBufferWarning",
    "disable", "disabled", "enable", "explain", "held", "is_enabled", "is_strict", "never_replay",
    "register_recompute", "set_strict",
]

logger = logging.getLogger("bufferfix")
settings.configure_logging()  # BUFFERFIX_LOG_LEVEL


def enable() -> bool:
    """Patch torch now if it is imported, else as soon as it is.  Returns whether bufferfix is on."""
    return registry.enable()


def disable() -> None:
    """Remove every patch bufferfix installed (recorded state is kept but unused)."""
    registry.disable()


def disabled() -> AbstractContextManager[None]:
    """``with bufferfix.disabled():`` bufferfix off inside the block, back to its previous state after."""
    return registry.disabled()


def is_enabled() -> bool:
    return registry.is_enabled()


def register_recompute(cls: type, fn: Callable | None = None):
    """See :func:`bufferfix.mechanism.recompute.register_recompute`."""
    from .mechanism import recompute

    return recompute.register_recompute(cls, fn)


def never_replay(cls: type) -> type:
    """See :func:`bufferfix.mechanism.recompute.never_replay`."""
    from .mechanism import recompute

    return recompute.never_replay(cls)


def explain(model) -> list[Recovery]:
    """How each non-persistent buffer (or plain tensor attribute) of ``model`` that needs a value
    would be recovered if it were materialised now; changes nothing.  Imports torch."""
    from .mechanism.restore import Materialisation

    return Materialisation(model).explain()


@dataclasses.dataclass(frozen=True)
class Held:
    """What bufferfix holds right now (for tests, benchmarks and leak hunting)."""

    recipes: int  # live modules with a recorded constructor
    snapshots: int  # real buffer values kept for a model moved to meta
    pending: int  # materialised tensors still waiting for a value, and parents waiting for their children
    bytes: int  # tensor memory held: snapshots and cached replays


def held() -> Held:
    """Count what bufferfix's side tables hold (dead entries swept first)."""
    if "bufferfix.mechanism.recording" not in sys.modules:  # nothing recorded yet (maybe no torch at all)
        return Held(0, 0, 0, 0)
    from .mechanism import recording, restore, snapshots

    return Held(recipes=recording.live_records(), snapshots=snapshots.count(),
                pending=restore.unfilled_count() + recording.awaiting_count(),
                bytes=snapshots.nbytes() + recording.replay_nbytes())


registry.enable()
