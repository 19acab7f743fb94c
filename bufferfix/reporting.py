"""The formatting layer: the only place :class:`~bufferfix.recovery.Recovery` values
become words (warnings, errors, debug logs, the doctor's report), and strict mode, which
decides between a warning and an error."""
import os
import sys
import sysconfig
from collections.abc import Iterable

from . import errors
from .activation import settings
from .recovery import Attempt, Reason, Recovery, Source

_SOURCES = {
    Source.KEPT: "real value kept",
    Source.SNAPSHOT: "snapshot taken before the move to meta",
    Source.RECOMPUTE_FUNCTION: "registered recompute function for {origin}",
    Source.REPLAY: "replay of {origin}(...)",
    Source.LIBRARY: "left to the library's own initialisation",
    Source.DERIVED: "recomputed from the parameters once they held values",
}

_REASONS = {
    Reason.NO_RECIPE: "it was born on meta and no constructor was recorded for it or its parents "
                      "(was the model built while bufferfix was active?)",
    Reason.REFUSED: "{origin}(...) is not re-run: {detail}",
    Reason.NEVER_REPLAY: "bufferfix.never_replay({origin}) forbids re-running its constructor",
    Reason.REPLAY_RAISED: "re-running {origin}(...) raised {detail}",
    Reason.NOT_CREATED: "re-running {origin}(...) did not create {detail!r}",
    Reason.ON_META: "re-running {origin}(...) puts it on meta explicitly",
    Reason.RANDOM: "re-running {origin}(...) draws it from the random number generator, so the normal "
                   "build's values are unknowable",
    Reason.MODIFIED_IN_PLACE: "it was modified in place after {origin}(...) returned",
    Reason.REPLACED: "{detail!r} was replaced on meta by code outside any constructor, so no replay has its "
                     "value; set it after materialisation instead",
    Reason.SHAPE_MISMATCH: "recovered value and materialised buffer differ in shape ({detail})",
    Reason.CAST_AFTER_DERIVED: "it was derived from {detail} before they were cast: a normal build keeps the value "
                               "from before the cast, which no checkpoint holds (the module's forward pre-hook "
                               "derives it again at every forward)",
    Reason.RECOMPUTE_RAISED: "recompute function for {origin} raised {detail}",
    Reason.FROM_PRETRAINED_WEIGHT: "{origin} computes {detail!r} from its base layer's pretrained weight when "
                                   "the adapter is made, and that weight was on meta: no replay or checkpoint "
                                   "has it; make this adapter on a loaded base model",
    Reason.INTERRUPTED: "the materialising call raised before its value was written ({detail})",
    Reason.INTERNAL_ERROR: "bufferfix failed internally ({detail}); details in the 'bufferfix' log",
}


_strict: bool | None = None  # None: follow BUFFERFIX_STRICT


def set_strict(strict: bool | None) -> None:
    """``True``: unrecoverable buffers raise; ``False``: they warn; ``None``: follow the env var."""
    global _strict
    _strict = strict


def is_strict() -> bool:
    return settings.flag(settings.STRICT) if _strict is None else bool(_strict)


# BUFFERFIX_STRICT is needed only when a buffer cannot be recovered; it is read now too, so that an invalid
# value is reported at start-up (one line on stderr), like the other variables', not at the first problem.
settings.flag(settings.STRICT)


def why(attempt: Attempt) -> str:
    return _REASONS[attempt.reason].format(origin=attempt.origin, detail=attempt.detail)


def explanation(recovery: Recovery) -> str:
    """How it was recovered, or why it was not: each reason once (the nearest module's attempt; a
    parent whose replay fails the same way adds nothing)."""
    if recovery.source is not None:  # recovered
        return _SOURCES[recovery.source].format(origin=recovery.origin)
    first: dict[Reason, Attempt] = {}
    for attempt in recovery.attempts:
        first.setdefault(attempt.reason, attempt)
    text = "; ".join(why(attempt) for attempt in first.values())
    if text:
        return text
    assert recovery.reason is not None  # not recovered and no attempts: its own reason says why
    return why(Attempt(None, recovery.reason, recovery.detail))


def describe(recovery: Recovery) -> str:
    """``name (Owner): how it was recovered`` or ``...: why it was not``."""
    return "%s (%s): %s" % (recovery.name, recovery.owner, explanation(recovery))


def _installed_paths() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(os.path.realpath(paths[key]) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")
                 if paths.get(key))


def own_class(recovery: Recovery) -> str | None:
    """The class holding the tensor, when it is the user's own code (not installed in site-packages
    or the standard library), else None; unknown (no recorded constructor names it) is None."""
    for origin in (recovery.origin, *(attempt.origin for attempt in recovery.attempts)):
        if not origin or not origin.endswith("." + recovery.owner):
            continue
        module = sys.modules.get(origin[:-len(recovery.owner) - 1])
        path = getattr(module, "__file__", None)
        if module is None or (path and os.path.realpath(path).startswith(_installed_paths())):
            return None
        return recovery.owner
    return None


def report_unrecoverable(recoveries: Iterable[Recovery]) -> None:
    """Warn (or raise in strict mode) about buffers left without a value, naming each one."""
    recoveries = tuple(recoveries)
    if not recoveries:
        return
    lines = "\n".join("  - " + describe(recovery) for recovery in recoveries)
    fixes = ["build the model normally (not on meta)",
             "register a recompute function with bufferfix.register_recompute(ModuleClass, fn)"]
    own = sorted({name for name in map(own_class, recoveries) if name})
    if own:
        fixes.append("in your own class %s, register the buffer with persistent=True so that checkpoints hold "
                     "its value" % " / ".join(own))
    message = (
        "bufferfix could not recover %d non-persistent buffer(s) after materialisation; "
        "they hold uninitialised memory:\n%s\n"
        "Fix: %s." % (len(recoveries), lines, "; or ".join(fixes))
    )
    if is_strict():
        raise errors.UnrecoverableBufferError(message, recoveries)
    errors.warn(errors.UnrecoverableBufferWarning(message, recoveries))


def internal_error(what: str) -> None:
    """bufferfix's own bookkeeping failed while ``what``: say so loudly (details are logged)."""
    errors.warn("bufferfix failed internally while %s; non-persistent buffers may hold "
                "uninitialised memory (details in the 'bufferfix' log)" % what)
