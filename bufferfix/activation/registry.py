"""The integration registry, and switching bufferfix on and off.

Each integration is patched by a wrapt post-import hook when its target module is imported
(at once if it already is): bufferfix never imports a library just to patch it.  A hook runs
inside the user's import, so it contains every exception.
"""
import contextlib
import importlib
import logging
import sys

from . import settings

logger = logging.getLogger("bufferfix")

# module whose import triggers the integration -> the integration's module
INTEGRATIONS = {
    "torch": "bufferfix.integrations.torch_nn",
    "transformers.modeling_utils": "bufferfix.integrations.transformers",
    "accelerate": "bufferfix.integrations.accelerate",
    "torchtune": "bufferfix.integrations.torchtune",
    "peft": "bufferfix.integrations.peft",
}

_enabled = False
_hooks_registered = False


def integration_name(module_name):
    """``bufferfix.integrations.accelerate`` -> ``accelerate`` (as BUFFERFIX_DISABLED_INTEGRATIONS lists it)."""
    return module_name.rpartition(".")[2]


def known_names():
    """The integration names BUFFERFIX_DISABLED_INTEGRATIONS accepts."""
    return frozenset(integration_name(module) for module in INTEGRATIONS.values())


def switched_off():
    """The integrations BUFFERFIX_DISABLED_INTEGRATIONS leaves unpatched (an unknown name warns, once)."""
    return settings.names(settings.DISABLED_INTEGRATIONS, known=known_names())


def _post_import_hook(integration_module):
    def instrument(module):
        """Runs inside the user's import: it must never make that import fail."""
        if not _enabled or integration_name(integration_module) in switched_off():
            return
        try:
            importlib.import_module(integration_module).INTEGRATION.instrument(module)
        except Exception as error:
            logger.exception("bufferfix: could not instrument %s; its buffers will not be restored", module.__name__)
            _warn_not_instrumented(module.__name__, error)

    return instrument


def _warn_not_instrumented(name, error):
    try:
        from ..errors import warn

        warn("bufferfix could not patch %s (%s: %s); non-persistent buffers of models materialised "
                    "through it will not be restored" % (name, type(error).__name__, error))
    except Exception:  # noqa: BLE001
        pass


def enable():
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

        for target, integration_module in INTEGRATIONS.items():  # runs at once for modules already imported
            wrapt.register_post_import_hook(_post_import_hook(integration_module), target)
        _hooks_registered = True
    else:
        for target, integration_module in INTEGRATIONS.items():
            if target in sys.modules:
                _post_import_hook(integration_module)(sys.modules[target])
    return True


def disable():
    """Remove every patch bufferfix installed (recorded state is kept but unused)."""
    global _enabled
    _enabled = False
    for integration_module in reversed(list(INTEGRATIONS.values())):
        patched = sys.modules.get(integration_module)
        if patched is not None:
            patched.INTEGRATION.uninstrument()


def is_enabled():
    return _enabled


@contextlib.contextmanager
def disabled():
    """bufferfix off inside the block, back to its previous state after."""
    was_enabled = _enabled
    disable()
    try:
        yield
    finally:
        if was_enabled:
            enable()
