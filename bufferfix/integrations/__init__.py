"""Integrations: where bufferfix hooks into torch and the libraries built on it.

One module per library, each defining ``INTEGRATION``, an instance of
:class:`bufferfix.integrations.base.Integration`; ``bufferfix/activation/registry.py`` lists
which module's import triggers which.  Adding a library is one file, one registry line and
its tests.
"""

# Importing torch here, before any integration module starts, matters when someone imports
# e.g. bufferfix.integrations.torch_nn before torch: torch's post-import hook then imports
# torch_nn fully instead of finding it half-initialised (and torch left unpatched).
import torch  # noqa: F401
