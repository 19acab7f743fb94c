"""``bufferfix-run COMMAND [ARGS...]`` (also ``python -m bufferfix run ...``).

Runs COMMAND with bufferfix active in it and in every Python process it starts (torchrun
workers, multiprocessing / DataLoader spawn workers, subprocesses), with no code change,
in the style of ``ddtrace-run`` / ``opentelemetry-instrument``: the bootstrap directory
``bufferfix/activation/bootstrap`` goes first on ``PYTHONPATH`` (its ``sitecustomize`` arms bufferfix
at start-up and then runs any ``sitecustomize`` it hides) and ``BUFFERFIX_AUTO=1`` is set;
then COMMAND replaces this process (``os.execvpe``), so signals and the exit status are
COMMAND's own.

Python processes must be able to import bufferfix (the same environment as bufferfix-run),
and must not run with ``-S`` (no site, so no sitecustomize) or ``-E``/``-I`` (which ignore
PYTHONPATH and every ``BUFFERFIX_*`` variable).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

USAGE = """\
usage: bufferfix-run [--] COMMAND [ARGS...]
       bufferfix-run --version | --help
       python -m bufferfix run [--] COMMAND [ARGS...]

Run COMMAND with bufferfix active in every Python process it starts (its children included):
sets BUFFERFIX_AUTO=1 and puts bufferfix's bootstrap sitecustomize first on PYTHONPATH.
Example: bufferfix-run torchrun --nproc_per_node 8 train.py

Environment: BUFFERFIX_DISABLE=1 turns bufferfix off anyway; BUFFERFIX_STRICT=1 makes an
unrecoverable buffer an error; BUFFERFIX_LOG_LEVEL=debug|info|warning sets its logging.
"""

BOOTSTRAP_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bootstrap")


def environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment COMMAND runs in: a copy of ``environ`` with bufferfix's start-up hook on."""
    env = dict(os.environ if environ is None else environ)
    entries = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    entries = [BOOTSTRAP_DIR] + [entry for entry in entries if os.path.abspath(entry) != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join(entries)
    env["BUFFERFIX_AUTO"] = "1"
    return env


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    elif argv[:1] and argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    elif argv[:1] == ["--version"]:
        from bufferfix import __version__

        print("bufferfix-run (bufferfix) %s" % __version__)
        return 0
    if not argv:
        sys.stderr.write(USAGE)
        return 2
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    try:
        os.execvpe(argv[0], argv, environment())
    except OSError as error:  # only reached when the exec failed
        sys.stderr.write("bufferfix-run: cannot run %r: %s\n" % (argv[0], error.strerror or error))
        return 127 if isinstance(error, FileNotFoundError) else 126
    return 0  # pragma: no cover - execvpe does not return


if __name__ == "__main__":
    sys.exit(main())
