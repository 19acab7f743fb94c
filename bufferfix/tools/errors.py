"""Problems a command reports in one line, with exit status 2 (see :mod:`bufferfix.tools.cli`)."""
import importlib
from types import ModuleType

INSTALL_TRANSFORMERS = "pip install 'bufferfix[transformers]'"  # transformers and accelerate


class UsageError(Exception):
    """Something the user can fix (a bad argument, a missing package): one line, exit 2."""


class MissingDependency(UsageError):
    """An optional package a command needs is not installed."""


def require(*modules: str, what: str, install: str = INSTALL_TRANSFORMERS) -> ModuleType:
    """Import ``modules`` (returns the first), or raise :class:`MissingDependency` saying that
    ``what`` needs them and the pip command that installs them."""
    imported = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ImportError as error:
            missing = error.name or name
            raise MissingDependency("%s needs %s, which is not installed: %s" % (what, missing, install)) from None
    return imported[0]


def one_line(error: BaseException) -> str:
    """``"TypeError: the first line of its message"``, at most ~300 characters."""
    text = str(error).strip()
    text = text.splitlines()[0] if text else ""
    if len(text) > 300:
        text = text[:297] + "..."
    return "%s: %s" % (type(error).__name__, text) if text else type(error).__name__
