"""Integrations: where bufferfix hooks into torch and the libraries built on it.

One module per library, each defining ``INTEGRATION``, an instance of an
:class:`bufferfix.integrations.base.Integration` subclass that declares its ``name``, its
``target`` (the module whose import triggers it) and what it does to the library, as data.  The
registry (``bufferfix/activation/registry.py``) is read off these modules, so adding a library is
one file and its tests.  Importing an integration module imports neither torch nor its library.
"""
