"""Command line: ``python -m bufferfix demo``."""
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bufferfix demo [--target-loss X]")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from . import demo

        return demo.main(rest)
    print("bufferfix: unknown command %r (try: demo)" % command, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
