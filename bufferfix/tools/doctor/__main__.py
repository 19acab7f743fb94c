"""``python -m bufferfix.tools.doctor``: the doctor's own ``BUFFERFIX_DISABLE=1`` child (use ``bufferfix doctor``)."""
import sys

from . import main

sys.exit(main())
