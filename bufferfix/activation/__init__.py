"""Activation: how bufferfix gets switched on, and off.

* ``registry``: which library module's import triggers which integration; ``enable`` /
  ``disable`` / ``disabled``; ``BUFFERFIX_DISABLED_INTEGRATIONS``.
* ``startup`` (installed as ``_bufferfix_startup``): ``BUFFERFIX_AUTO=1`` through the
  start-up ``.pth``, standard library only; its ``settings`` parse every ``BUFFERFIX_*``
  variable.
* ``launcher``: ``bufferfix-run COMMAND``, with ``bootstrap/sitecustomize.py`` for the
  processes it starts.
"""
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the same file, which mypy reads by its package path
    from .startup import settings
else:
    try:
        from _bufferfix_startup import settings
    except ImportError:  # a source tree on sys.path, not installed: the same file, by its package path
        from .startup import settings  # noqa: F401
