"""Command line: ``python -m bufferfix demo`` and ``python -m bufferfix run COMMAND...``."""
import sys

USAGE = """\
usage: python -m bufferfix demo [--target-loss X]
       python -m bufferfix run [--] COMMAND [ARGS...]   (same as bufferfix-run COMMAND...)
"""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        (sys.stdout if argv else sys.stderr).write(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from . import demo

        return demo.main(rest)
    if command == "run":
        from . import launcher

        return launcher.main(rest)
    print("bufferfix: unknown command %r (try: demo, run)" % command, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
