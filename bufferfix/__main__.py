"""Command line: ``python -m bufferfix demo | doctor TARGET | run COMMAND...``."""
import importlib
import sys

USAGE = """\
usage: python -m bufferfix demo [--target-loss X] [--realistic-memory] [--plot FILE.png] [--json FILE]
       python -m bufferfix doctor TARGET [--json]    (TARGET: model dir, model type such as llama, or module:callable)
       python -m bufferfix run [--] COMMAND [ARGS...]   (same as bufferfix-run COMMAND...)
Each command takes --help.
"""
COMMANDS = {"demo": "demo", "doctor": "doctor", "run": "launcher"}  # command -> module with main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print("bufferfix: unknown command %r (try: %s)" % (command, ", ".join(COMMANDS)), file=sys.stderr)
        return 2
    return importlib.import_module("bufferfix." + COMMANDS[command]).main(rest)


if __name__ == "__main__":
    sys.exit(main())
