"""``bufferfix doctor TARGET``: its arguments and what it prints (see :mod:`bufferfix.tools.doctor`)."""
import argparse
import json
import os
import sys

from .targets import EXAMPLES

HELP = "audit one model: its non-persistent buffers, how bufferfix recovers each, every flow checked"
DESCRIPTION = ("List a model's non-persistent buffers, how bufferfix recovers each one, and check every meta-device "
               "flow bit for bit against a normal build, with bufferfix and without it (a fresh BUFFERFIX_DISABLE=1 "
               "interpreter).")
EPILOG = ("TARGET: a directory written by save_pretrained; a transformers model type (%s) or class name, built from "
          "its default config shrunk to a tiny size; or module:callable / file.py:callable returning an nn.Module. "
          "Exit status: 0 no problem in the flows checked (any flow not checked is named, with why), 1 a buffer cannot "
          "be recovered or a flow is wrong with bufferfix, 2 a bad target or a missing package." % EXAMPLES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET", help="model directory, model type or class name, or module:callable")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--class", dest="model_class", metavar="NAME",
                        help="the transformers model class to build (default: the directory's architectures "
                             "field; for a model type its causal LM for decoders, else its base model)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow a local model directory's custom code to run")
    parser.add_argument("--flows-only", action="store_true", help=argparse.SUPPRESS)  # the child: one JSON line


def run(arguments: argparse.Namespace) -> int:
    """The doctor; returns the exit status (raises :class:`~bufferfix.tools.errors.UsageError`)."""
    import bufferfix

    from .. import unpatched
    from . import report
    from .targets import resolve

    if arguments.flows_only:  # in the BUFFERFIX_DISABLE=1 child
        target = resolve(arguments.target, arguments.model_class, arguments.trust_remote_code)
        unpatched.answer(report.measure_target(target, patched=False))
        return 0
    if not bufferfix.is_enabled():
        os.environ.pop("BUFFERFIX_DISABLE", None)  # the doctor checks bufferfix: it must be on here
        if not bufferfix.enable():
            raise RuntimeError("bufferfix cannot be enabled")
    progress = (lambda text: None) if arguments.json else (
        lambda text: print("... " + text, file=sys.stderr, flush=True))
    found = report.diagnose(arguments, progress)
    print(json.dumps(found, indent=1) if arguments.json else report.format_report(found))
    return 0 if found["ok"] else 1
