"""The user-facing tools, beside the library (nothing in ``bufferfix`` imports them).

- :mod:`bufferfix.tools.cli`: the ``bufferfix`` / ``python -m bufferfix`` command line;
- :mod:`bufferfix.tools.doctor`: ``bufferfix doctor TARGET``, audit one model;
- :mod:`bufferfix.tools.demo`: ``bufferfix demo``, transformers issue 36577 reproduced offline;
- helpers the tools share with the test suite (``tests/`` imports them, it does not copy them):
  :mod:`~bufferfix.tools.compare` (bit-for-bit comparison with a normal build),
  :mod:`~bufferfix.tools.tiny_configs` (a transformers default config, shrunk to a tiny size),
  :mod:`~bufferfix.tools.unpatched` (the same work in a fresh interpreter with ``BUFFERFIX_DISABLE=1``).
"""
