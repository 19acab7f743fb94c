"""Start-up activation (``BUFFERFIX_AUTO=1``): patch torch as soon as a process imports it.

This package is installed as the top-level ``_bufferfix_startup`` (setup.cfg maps it), so
that start-up can import it without importing ``bufferfix``, whose import enables
bufferfix and imports wrapt (~150 ms): a process that never imports torch must not pay
that.  It uses the standard library only.  Two things import it at interpreter start-up:

- ``bufferfix-startup.pth`` in site-packages, one line in the style of setuptools'
  ``distutils-precedence.pth``: ``BUFFERFIX_AUTO`` set to a non-false value -> import
  this module and :func:`install`;
- ``bufferfix/activation/bootstrap/sitecustomize.py``, which ``bufferfix-run`` puts on
  PYTHONPATH.

:func:`install` puts a tiny finder first on ``sys.meta_path`` that waits for ``import
torch``; only then does it import bufferfix (whose import enables it, honouring
``BUFFERFIX_DISABLE``) and remove itself.  Torch is then patched when its module has
finished executing, exactly as after ``import bufferfix; import torch``.

Every failure is contained: it is reported once on stderr and the process goes on
unpatched.  Installing twice (the .pth processed twice, .pth plus sitecustomize) is a no-op.
"""
from __future__ import annotations

import os
import sys

from . import settings

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing on the start-up path
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

_TRIGGER = "torch"
_reported: set[str] = set()


def report(message: str) -> None:
    """One line on stderr, once per distinct message; never raises."""
    if message in _reported:
        return
    _reported.add(message)
    try:
        sys.stderr.write("bufferfix: %s\n" % message)
    except Exception:  # noqa: BLE001
        pass


def requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether start-up activation is asked for: ``BUFFERFIX_AUTO`` true, ``-E``/``-I`` not given,
    ``BUFFERFIX_DISABLE`` not true.  An invalid ``BUFFERFIX_AUTO`` warns once and means no."""
    if sys.flags.ignore_environment and environ is None:
        return False
    if not settings.flag(settings.AUTO, environ=environ):
        return False
    # an invalid BUFFERFIX_DISABLE is reported by bufferfix.enable() itself, later: stay quiet here
    return not settings.flag(settings.DISABLE, environ=environ, warn=False)


class TorchImportTrigger:
    """``sys.meta_path`` finder that enables bufferfix when ``torch`` is first imported, then leaves.

    It never finds a module itself: for any other name it returns None at once.
    """

    _bufferfix_trigger = True  # how install() recognises a trigger, whichever copy of this module made it
    _searching = False

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname == "bufferfix":
            uninstall()  # the program imports bufferfix itself: its own enable() takes over
            return _find_again(fullname)
        if fullname != _TRIGGER or self._searching:
            return None
        self._searching = True  # the search below goes through sys.meta_path, this finder included
        try:
            spec = _find_again(fullname)
        finally:
            self._searching = False
        if spec is None:
            return None  # torch is not importable (a `try: import torch` probe): stay armed, import nothing
        uninstall()
        if not activate():
            return spec  # torch is imported unpatched
        # the enabled bufferfix has put wrapt's post-import hook finder first on sys.meta_path, after
        # the import system started going through it: search again so that it is consulted.
        return _find_again(fullname)

    def invalidate_caches(self) -> None:
        pass

    def __repr__(self) -> str:
        return "<bufferfix start-up trigger: enables bufferfix when torch is imported>"


def _find_again(fullname: str) -> ModuleSpec | None:
    """The spec the import system finds for ``fullname`` (the trigger returning None for it).

    Removing an entry from ``sys.meta_path`` while the import system goes through it makes
    it skip the next one, so the trigger never returns None after removing itself.
    """
    try:
        import importlib.util

        return importlib.util.find_spec(fullname)
    except Exception as error:  # noqa: BLE001  (the caller's import then fails as it would have)
        report("BUFFERFIX_AUTO: could not hook the import of %s (%s: %s)" % (fullname, type(error).__name__, error))
        return None


def activate() -> bool:
    """Import bufferfix (its import enables it).  Returns whether it is enabled; never raises."""
    try:
        import bufferfix
    except Exception as error:  # noqa: BLE001
        report("BUFFERFIX_AUTO is set but bufferfix could not be imported by %s (%s: %s); it is not active"
               % (sys.executable, type(error).__name__, error))
        return False
    try:
        enabled = bufferfix.is_enabled()
        if enabled:
            import logging

            logging.getLogger("bufferfix").debug("bufferfix: enabled at start-up (%s) in process %d",
                                                 settings.AUTO, os.getpid())
        return enabled
    except Exception as error:  # noqa: BLE001
        report("BUFFERFIX_AUTO: %s: %s" % (type(error).__name__, error))
        return False


def installed() -> bool:
    return any(getattr(finder, "_bufferfix_trigger", False) for finder in sys.meta_path)


def install(environ: Mapping[str, str] | None = None) -> bool:
    """Arm start-up activation if :func:`requested`.  Idempotent; never raises.

    Returns True when armed (or enabled already, if torch was imported before).
    """
    try:
        if not requested(environ):
            return False
        if _TRIGGER in sys.modules:
            return activate()
        if not installed():
            sys.meta_path.insert(0, TorchImportTrigger())
        return True
    except Exception as error:  # noqa: BLE001
        report("BUFFERFIX_AUTO: start-up hook failed (%s: %s); bufferfix is not active"
               % (type(error).__name__, error))
        return False


def uninstall() -> None:
    """Remove every trigger (from any copy of this module) from ``sys.meta_path``."""
    try:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not getattr(finder, "_bufferfix_trigger", False)]
    except Exception:  # noqa: BLE001
        pass
