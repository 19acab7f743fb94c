"""Integrations: where bufferfix hooks into torch and the libraries built on it.

Each module has ``instrument()`` / ``uninstrument()``, both idempotent.
"""

# Importing torch here, before any integration module starts, matters when someone imports
# e.g. bufferfix.integrations.torch_nn before torch: torch's post-import hook then imports
# torch_nn fully instead of finding it half-initialised (and torch left unpatched).
import torch  # noqa: E402,F401
