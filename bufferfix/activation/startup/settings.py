"""The ``BUFFERFIX_*`` environment variables, parsed with the standard library only.

Installed as ``_bufferfix_startup.settings`` (see ``bufferfix/activation/startup``): it runs
on the interpreter start-up path, so it must stay cheap and must never raise: a bad value
gives one warning on stderr and the safe default.  The package reads it as
``bufferfix.activation.settings``.

=======================  =========================================================
``BUFFERFIX_AUTO``       ``1``: activate at interpreter start-up in every Python
                         process of the environment (through the installed
                         ``bufferfix-startup.pth``), as soon as torch is imported
``BUFFERFIX_DISABLE``    ``1``: never patch anything; beats everything else,
                         ``import bufferfix`` and ``enable()`` included
``BUFFERFIX_STRICT``     ``1``: an unrecoverable buffer raises instead of warning
``BUFFERFIX_LOG_LEVEL``  ``debug``/``info``/``warning``/``error``/``critical`` (or
                         a number): level of ``logging.getLogger("bufferfix")``
``BUFFERFIX_DISABLED_``  comma-separated integration names (``transformers``,
``INTEGRATIONS``         ``accelerate``, ...): leave those libraries unpatched
=======================  =========================================================

Booleans accept ``1/true/yes/on`` and ``0/false/no/off`` (any case, spaces
ignored); empty means unset.  An invalid value (an unknown integration name too)
gives one line on stderr when bufferfix starts, and is ignored.
"""
from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the start-up path
if TYPE_CHECKING:
    import logging as _logging
    from collections.abc import Mapping
    from types import ModuleType

AUTO = "BUFFERFIX_AUTO"  # "1": activate at start-up (site hook), patching torch when it is imported
DISABLE = "BUFFERFIX_DISABLE"  # "1": never patch anything, even on `import bufferfix`
STRICT = "BUFFERFIX_STRICT"  # "1": an unrecoverable buffer raises instead of warning
LOG_LEVEL = "BUFFERFIX_LOG_LEVEL"  # "debug", "info", ...: level of the "bufferfix" logger
DISABLED_INTEGRATIONS = "BUFFERFIX_DISABLED_INTEGRATIONS"  # "accelerate,transformers": leave those unpatched

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50, "fatal": 50}
_already_complained: set[str] = set()


def _complain(name: str, value: str | None, expected: str, default: str) -> None:
    if name not in _already_complained:
        _already_complained.add(name)
        try:
            sys.stderr.write("bufferfix: ignoring %s=%r (expected %s); using %s\n" % (name, value, expected, default))
        except Exception:  # noqa: BLE001  (no stderr at all: stay silent rather than fail)
            pass


def flag(name: str, default: bool = False, environ: Mapping[str, str] | None = None, warn: bool = True) -> bool:
    """Read a boolean switch leniently; never raises.

    An unrecognised value warns once per variable on stderr (unless ``warn`` is false) and
    gives ``default``.
    """
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        return default
    normalised = value.strip().lower()
    if normalised in _TRUE:
        return True
    if normalised in _FALSE:
        return False
    if warn:
        _complain(name, value, "1/true/yes/on or 0/false/no/off", "1" if default else "0")
    return default


def names(name: str, environ: Mapping[str, str] | None = None,
          known: frozenset[str] | None = None) -> frozenset[str]:
    """A comma-separated list of names (``BUFFERFIX_DISABLED_INTEGRATIONS``), lower-cased; never raises.

    With ``known`` (the names that mean something), unknown ones warn once per variable on stderr,
    naming them and the known names, and are left out."""
    value = (os.environ if environ is None else environ).get(name) or ""
    found = frozenset(part.strip().lower() for part in value.split(",") if part.strip())
    if known is None or found <= known:
        return found
    unknown = sorted(found - known)
    if name not in _already_complained:
        _already_complained.add(name)
        try:
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(known), n=1) if len(unknown) == 1 else []
            sys.stderr.write("bufferfix: %s=%r: unknown name%s %s%s, ignored; the known names are %s\n" % (
                name, value, "s" if len(unknown) > 1 else "", ", ".join(map(repr, unknown)),
                " (did you mean %r?)" % close[0] if close else "", ", ".join(sorted(known))))
        except Exception:  # noqa: BLE001  (no stderr at all: stay silent rather than fail)
            pass
    return found & known


def log_level(environ: Mapping[str, str] | None = None) -> int | None:
    """``BUFFERFIX_LOG_LEVEL`` as a ``logging`` level number, or None when unset, empty or invalid."""
    value = (os.environ if environ is None else environ).get(LOG_LEVEL)
    if value is None or not value.strip():
        return None
    normalised = value.strip().lower()
    if normalised in _LEVELS:
        return _LEVELS[normalised]
    if normalised.isdigit():
        return int(normalised)
    _complain(LOG_LEVEL, value, "debug, info, warning, error, critical or a number", "the default level")
    return None


def configure_logging(environ: Mapping[str, str] | None = None) -> int | None:
    """Apply ``BUFFERFIX_LOG_LEVEL`` to the ``bufferfix`` logger; returns the level or None.

    Never raises; idempotent.  Besides setting the level it attaches one handler that
    prints to stderr while the application has configured no logging of its own (no
    handler on the root logger), because Python's last-resort handler drops everything
    below WARNING.  Once the root logger has handlers, records reach them by propagation.
    """
    level = log_level(environ)
    if level is None:
        return None
    try:
        import logging

        logger = logging.getLogger("bufferfix")
        logger.setLevel(level)
        if not any(getattr(handler, "_bufferfix_fallback", False) for handler in logger.handlers):
            logger.addHandler(_fallback_handler(logging))
    except Exception as error:  # noqa: BLE001
        _complain(LOG_LEVEL, os.environ.get(LOG_LEVEL), "a level the logging module accepts (%s)" % error,
                  "the default level")
        return None
    return level


def _fallback_handler(logging: ModuleType) -> _logging.Handler:
    # the base class is read off the logging module passed in (imported only once a level is set)
    class StderrWhileUnconfigured(logging.Handler):  # type: ignore[name-defined]
        _bufferfix_fallback = True

        def emit(self, record: _logging.LogRecord) -> None:
            if logging.getLogger().handlers:  # the application configured logging: it decides
                return
            try:
                sys.stderr.write(self.format(record) + "\n")
            except Exception:  # noqa: BLE001
                self.handleError(record)

    handler = StderrWhileUnconfigured()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))  # messages start with "bufferfix:"
    return handler
