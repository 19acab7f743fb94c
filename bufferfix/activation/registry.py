"""The integration registry, and switching bufferfix on and off.

The registry is what the integrations declare: every module of ``bufferfix.integrations`` (its
``base`` aside) defines ``INTEGRATION``, whose ``name`` and ``target`` say what it is called and
which module's import triggers it.  Those modules import neither torch nor their libraries when
they are imported, so reading them costs a few small imports.

Each integration is patched by a wrapt post-import hook when its target module is imported
(at once if it already is): bufferfix never imports a library just to patch it.  A hook runs
inside the user's import, so it contains every exception.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING

from . import settings

if TYPE_CHECKING:
    from ..integrations.base import Integration

logger = logging.getLogger("bufferfix")

_enabled = False
_hooks_registered = False
_integrations: list[Integration] | None = None


def integrations() -> list[Integration]:
    """Every integration, torch's first (the others' libraries import torch)."""
    global _integrations
    if _integrations is None:
        from .. import integrations as package

        found = [importlib.import_module("%s.%s" % (package.__name__, info.name)).INTEGRATION
                 for info in pkgutil.iter_modules(package.__path__) if info.name != "base"]
        _integrations = sorted(found, key=lambda integration: (integration.target != "torch", integration.name))
    return _integrations


def known_names() -> frozenset[str]:
    """The integration names BUFFERFIX_DISABLED_INTEGRATIONS accepts."""
    return frozenset(integration.name for integration in integrations())


def switched_off() -> frozenset[str]:
    """The integrations BUFFERFIX_DISABLED_INTEGRATIONS leaves unpatched (an unknown name warns, once)."""
    return settings.names(settings.DISABLED_INTEGRATIONS, known=known_names())


def _post_import_hook(integration: Integration) -> Callable[[ModuleType], None]:
    def instrument(module: ModuleType) -> None:
        """Runs inside the user's import: it must never make that import fail."""
        if not _enabled or integration.name in switched_off():
            return
        try:
            integration.instrument(module)
        except Exception as error:
            logger.exception("bufferfix: could not instrument %s; its buffers will not be restored", module.__name__)
            _warn_not_instrumented(module.__name__, error)

    return instrument


def _warn_not_instrumented(name: str, error: Exception) -> None:
    try:
        from ..errors import warn

        warn("bufferfix could not patch %s (%s: %s); non-persistent buffers of models materialised "
                    "through it will not be restored" % (name, type(error).__name__, error))
    except Exception:  # noqa: BLE001
        pass


def enable() -> bool:
    """Patch torch now if it is imported, else as soon as it is.  Returns whether bufferfix is on."""
    global _enabled, _hooks_registered
    if settings.flag(settings.DISABLE):
        logger.info("bufferfix: %s is set; not patching anything", settings.DISABLE)
        return False
    _enabled = True
    off = switched_off()
    if off:
        logger.info("bufferfix: %s: not patching %s", settings.DISABLED_INTEGRATIONS, ", ".join(sorted(off)))
    if not _hooks_registered:
        import wrapt  # only now: it costs ~150 ms and a disabled bufferfix must not pay it

        for integration in integrations():  # runs at once for modules already imported
            wrapt.register_post_import_hook(_post_import_hook(integration), integration.target)
        _hooks_registered = True
    else:
        for integration in integrations():
            if integration.target in sys.modules:
                _post_import_hook(integration)(sys.modules[integration.target])
    return True


def disable() -> None:
    """Remove every patch bufferfix installed (recorded state is kept but unused)."""
    global _enabled
    _enabled = False
    for integration in reversed(integrations()):
        integration.uninstrument()


def is_enabled() -> bool:
    return _enabled


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """bufferfix off inside the block, back to its previous state after."""
    was_enabled = _enabled
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()
