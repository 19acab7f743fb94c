"""The ``bufferfix`` command (also ``python -m bufferfix``): ``demo``, ``doctor`` and ``run``.

Each tool module gives ``HELP``, ``DESCRIPTION``, ``EPILOG``, ``add_arguments(parser)`` and
``run(arguments) -> exit status``; this module turns them into one argparse command line and
handles what every command shares: ``--version``, a one-line error with exit status 2 for a
:class:`~bufferfix.tools.errors.UsageError` (a bad target, a missing package), and a quiet exit
when stdout is a pipe closed early (``bufferfix doctor llama --json | head``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType

from .errors import UsageError

TOOLS = {"demo": "bufferfix.tools.demo", "doctor": "bufferfix.tools.doctor.cli"}  # command -> module

SUMMARY = """\
bufferfix keeps PyTorch's non-persistent buffers (rotary inv_freq, position ids, masks...) right when a model
is built on the meta device and materialised (to_empty, FSDP, accelerate, transformers): import bufferfix."""

ENVIRONMENT = [  # the README's table "Environment variables", in short
    ("BUFFERFIX_AUTO=1", "activate at start-up in every Python process of this environment"),
    ("BUFFERFIX_DISABLE=1", "patch nothing, whatever else says so"),
    ("BUFFERFIX_DISABLED_INTEGRATIONS=a,b", "leave these integrations out (torch_nn, transformers, accelerate...)"),
    ("BUFFERFIX_STRICT=1", "an unrecoverable buffer raises UnrecoverableBufferError instead of warning"),
    ("BUFFERFIX_LOG_LEVEL=LEVEL", "debug, info, warning, error or critical: the 'bufferfix' logger's level"),
]

EXAMPLES = """\
  bufferfix demo                               train a tiny LM, reload it through every flow (under a minute)
  bufferfix demo --max-steps 200 --save DIR    stop training sooner; keep the trained model in DIR
  bufferfix doctor llama                       audit a model type, a save_pretrained directory or module:callable
  bufferfix-run torchrun --nproc_per_node 8 train.py
                                               bufferfix on in every Python process of a command, no code change"""


def version() -> str:
    import bufferfix

    return "bufferfix %s" % bufferfix.__version__


def program_name(argv0: str | None = None) -> str:
    """``bufferfix`` as the console script, ``python -m bufferfix`` as a module: how the user ran it."""
    argv0 = sys.argv[0] if argv0 is None else argv0
    if os.path.basename(argv0) in ("__main__.py", "-m", "-c", ""):
        return "python -m bufferfix"
    return os.path.basename(argv0)


def _epilog() -> str:
    width = max(len(name) for name, _ in ENVIRONMENT) + 2
    return ("also:\n  bufferfix-run COMMAND...                     run COMMAND with bufferfix active in it and "
            "its children\n\nexamples:\n%s\n\nenvironment variables:\n%s\n\nEach command takes --help."
            % (EXAMPLES, "\n".join("  %-*s %s" % (width, name, text) for name, text in ENVIRONMENT)))


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The whole command line (every tool's arguments under its subcommand)."""
    prog = prog or program_name()
    top = argparse.ArgumentParser(prog=prog, description=SUMMARY, epilog=_epilog(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--version", action="version", version=version())
    commands = top.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module_name in TOOLS.items():
        tool = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=tool.HELP, description=tool.DESCRIPTION, epilog=tool.EPILOG)
        tool.add_arguments(sub)
        sub.set_defaults(tool=tool)
    commands.add_parser("run", help="run a command with bufferfix active in every Python process it starts "
                                    "(same as bufferfix-run; see run --help)", add_help=False)
    return top


def _launcher() -> ModuleType:
    from bufferfix.activation import launcher

    return launcher


def _dispatch(argv: list[str], prog: str | None) -> int:
    if argv[:1] == ["run"]:  # everything after it is the command to run, options included
        return _launcher().main(argv[1:])
    arguments = parser(prog).parse_args(argv)
    if arguments.command is None:
        parser(prog).print_help(sys.stderr)
        return 2
    try:
        return arguments.tool.run(arguments)
    except UsageError as error:
        print("bufferfix %s: %s" % (arguments.command, error), file=sys.stderr)
        return 2


def quiet_on_closed_pipe(function: Callable[..., int], *arguments: object) -> int:
    """``function(*arguments)``, whose return value is the exit status; if stdout is a pipe that the
    reader closed (``| head``), exit 1 quietly instead of a BrokenPipeError traceback (the recipe in
    the CPython documentation of the ``signal`` module, "Note on SIGPIPE")."""
    try:
        status = function(*arguments)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)  # the interpreter's own flush at exit goes nowhere
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """The ``bufferfix`` console script and ``python -m bufferfix``; returns the exit status."""
    return quiet_on_closed_pipe(_dispatch, list(sys.argv[1:] if argv is None else argv), prog)


def run_tool(command: str, argv: Sequence[str] | None = None) -> int:
    """One tool on its own (``python -m bufferfix.tools.doctor``: the tools' child interpreters)."""
    return main([command] + list(sys.argv[1:] if argv is None else argv), prog="bufferfix")
