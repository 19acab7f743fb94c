"""Plumbing shared by the integrations: containment and the plan/call/restore sandwich."""
import logging

from .. import errors
from ..mechanism.materialise import Materialisation

logger = logging.getLogger("bufferfix")


def contained(action, what):
    """Run bufferfix's own bookkeeping; an internal failure must never break the user's call."""
    try:
        return action()
    except errors.UnrecoverableBufferError:
        raise
    except Exception:  # noqa: BLE001
        logger.exception("bufferfix: internal error while %s", what)
        errors.warn("bufferfix failed internally while %s; non-persistent buffers may hold "
                    "uninitialised memory (details in the 'bufferfix' log)" % what)
        return None


def materialising(call, model, recurse=True, device=None, hold_replays=None):
    """Run ``call()``, which swaps ``model``'s tensors for empty ones; then restore the buffers.
    With ``hold_replays``, values only a replay can give are held back and handed to it as a
    ``DeferredRestore`` (see the transformers integration)."""
    plan = contained(lambda: Materialisation(model, recurse), "planning buffer restoration")
    result = call()
    if plan is not None:
        deferred = contained(lambda: plan.restore(device, defer_replays=hold_replays is not None),
                             "restoring non-persistent buffers")
        if deferred is not None:
            hold_replays(deferred)
    return result
