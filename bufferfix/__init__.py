"""bufferfix: non-persistent buffers survive meta-device materialisation.

``import bufferfix`` is all a program needs: torch is patched as soon as it is
imported (now, if it already is), never imported by bufferfix itself.
``BUFFERFIX_DISABLE=1`` turns every form of activation off, this one included.

Layout: ``activation/`` (switching on: import, start-up hook, launcher) ->
``integrations/`` (one module per library) -> ``mechanism/`` (recording, recipes and
replay, restore); ``tools/`` (the ``bufferfix`` command) beside them.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, TypeVar, overload

from .activation import registry, settings
from .errors import BufferFixWarning, UnrecoverableBufferError, UnrecoverableBufferWarning
from .recovery import Attempt, Reason, Recovery, Source  # standard library only
from .reporting import is_strict, set_strict

if TYPE_CHECKING:
    from torch import nn

    from .mechanism.recompute import RecomputeFunction
    from .tools.check import CheckReport

_Recompute = TypeVar("_Recompute", bound="RecomputeFunction")

__version__ = "0.2.0"
__all__ = [
    "Attempt", "BufferFixWarning", "Held", "Reason", "Recovery", "Source", "UnrecoverableBufferError",
    "UnrecoverableBufferWarning",
    "check", "disable", "disabled", "enable", "explain", "held", "is_enabled", "is_strict", "never_replay",
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


@overload
def register_recompute(cls: type, fn: None = None) -> Callable[[_Recompute], _Recompute]: ...


@overload
def register_recompute(cls: type, fn: _Recompute) -> _Recompute: ...


def register_recompute(cls: type, fn: RecomputeFunction | None = None
                       ) -> RecomputeFunction | Callable[[RecomputeFunction], RecomputeFunction]:
    """See :func:`bufferfix.mechanism.recompute.register_recompute`."""
    from .mechanism import recompute

    return recompute.register_recompute(cls, fn)


def never_replay(cls: type) -> type:
    """See :func:`bufferfix.mechanism.recompute.never_replay`."""
    from .mechanism import recompute

    return recompute.never_replay(cls)


def explain(model: nn.Module) -> list[Recovery]:
    """How each non-persistent buffer (or plain tensor attribute) of ``model`` that needs a value
    would be recovered if it were materialised now; changes nothing.  Imports torch."""
    from .mechanism.restore import Materialisation

    return Materialisation(model).explain()


def check(build: Callable[[], nn.Module], *, patched: bool = True) -> CheckReport:
    """Run every meta-device flow on the model ``build()`` returns and compare its non-persistent
    buffers and plain tensor attributes with a normal build, bit for bit (value, dtype, device).

    For library maintainers' and users' own test suites:

    ```python
    report = bufferfix.check(lambda: MyModel(MyConfig()))
    assert report.ok, report
    ```

    Args:
        build: a zero-argument callable returning the model (a ``torch.nn.Module``); called once for
            the normal build, and once for each flow that builds the model.
        patched: ``True`` (the default) runs the flows with bufferfix on; ``False`` with bufferfix
            switched off (``bufferfix.disabled()``), to show what the model's own code does, e.g. to
            catch a regression of a library's own ``_init_weights``.

    Returns:
        A ``CheckReport`` (from ``bufferfix.tools.check``). Its ``.ok`` is true when every flow that
            ran gave every tensor back exactly; its ``.problems`` name the flow, the module path, the
            tensor, and what differs or why bufferfix cannot recover it; its ``.not_checked`` names
            the flows that did not run, and why. ``str(report)`` is readable, so
            ``assert report.ok, report`` explains itself.

    The flows are those of ``bufferfix.flows.FLOWS``, plus ``save_pretrained`` ->
    ``from_pretrained`` when the model is a transformers ``PreTrainedModel``; the two accelerate
    flows are not checked when accelerate is not installed.  Uninitialised memory is poisoned
    (NaN / max-int) while they run, so a lost buffer never matches by luck.  The normal build's own
    exceptions propagate.  The global RNG state, and whether bufferfix is on, are as they were
    afterwards.  Imports torch.
    """
    from .tools.check import check as run_check

    return run_check(build, patched=patched)


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
