"""``bufferfix doctor TARGET``: which non-persistent buffers a model has, how bufferfix recovers
each one, and whether every meta-device flow really gives them back.

The doctor

1. builds the model under ``torch.device("meta")`` and asks :func:`bufferfix.explain`, which
   changes nothing, how it would recover each non-persistent buffer (:class:`bufferfix.Recovery`
   values: constructor replay, a registered recompute function, or why it cannot);
2. runs every flow :func:`bufferfix.check` runs (those of :data:`bufferfix.flows.FLOWS`, plus
   ``save_pretrained`` -> ``from_pretrained`` for transformers models) and compares the buffers
   bit for bit (value, dtype, device) with a normal build: with bufferfix in this interpreter, and
   without it in a fresh interpreter started with ``BUFFERFIX_DISABLE=1`` (genuinely unpatched).
   A flow that cannot run (accelerate not installed) or raises with and without bufferfix is
   reported as not checked, with why.

One module per step: :mod:`.targets` (TARGET -> what to build), :mod:`.report` (the
measurements of :mod:`bufferfix.tools.check` and the verdicts, as a dict and as text), :mod:`.cli`
(arguments).  Exit status: 0 no problem in the flows checked; 1 a buffer bufferfix cannot
recover, or a flow that is wrong with bufferfix; 2 a bad target (one line on stderr).
"""
from collections.abc import Sequence
from typing import Any

from .targets import Target, TargetError, resolve  # noqa: F401


# the report imports torch: only when it is used, not for ``bufferfix --help``; Any: whichever function is asked for
def __getattr__(name: str) -> Any:
    if name in ("diagnose", "format_report"):
        from . import report

        return getattr(report, name)
    raise AttributeError("module %r has no attribute %r" % (__name__, name))


def main(argv: Sequence[str] | None = None) -> int:
    """``bufferfix doctor`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    from ..cli import run_tool

    return run_tool("doctor", argv)
