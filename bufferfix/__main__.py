"""``python -m bufferfix``: the command line (see :mod:`bufferfix.tools.cli`)."""
import sys

from bufferfix.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
