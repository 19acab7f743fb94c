"""``bufferfix-run``'s sitecustomize: arm bufferfix, then run the sitecustomize it hides.

``bufferfix-run`` puts this directory first on PYTHONPATH and sets ``BUFFERFIX_AUTO=1``,
so every Python process started under it (and their children: torchrun workers,
multiprocessing and DataLoader spawn workers) imports this module at start-up.  It arms
``_bufferfix_startup`` (bufferfix/activation/startup), then imports the ``sitecustomize`` that would have run
without bufferfix-run (the next one on ``sys.path``), so an existing one keeps working;
its errors are reported by ``site`` exactly as they would have been.
"""
import os
import sys


def _arm() -> None:
    try:
        # standard library only: nothing heavy happens until torch is imported.  Installed top-level by
        # setup.py; mypy reads the same file as bufferfix.activation.startup
        import _bufferfix_startup  # type: ignore[import-not-found]

        _bufferfix_startup.install()
    except Exception as error:  # noqa: BLE001
        try:
            sys.stderr.write("bufferfix-run: the start-up hook failed (%s: %s); bufferfix is not active\n"
                             % (type(error).__name__, error))
        except Exception:  # noqa: BLE001
            pass


def _chain() -> None:
    """Import the next ``sitecustomize`` on sys.path, as ``site`` would have without this one."""
    here = os.path.dirname(os.path.abspath(__file__))
    positions = [index for index, entry in enumerate(sys.path) if os.path.abspath(entry or os.curdir) == here]
    for index in reversed(positions):
        del sys.path[index]
    this = sys.modules.pop("sitecustomize", None)
    try:
        # the import system puts it in sys.modules in our place; which file it is depends on sys.path at run time
        import sitecustomize  # type: ignore[import-not-found]  # noqa: F401
    except ImportError as error:
        if error.name != "sitecustomize":
            raise  # an error inside it: let site report it, as it would have
        if this is not None:
            sys.modules["sitecustomize"] = this
    finally:
        for index in positions:
            sys.path.insert(index, here)


_arm()
_chain()
