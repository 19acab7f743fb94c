"""Integrations: where bufferfix hooks into torch and the libraries built on it.

Each module has ``instrument()`` / ``uninstrument()``, both idempotent.
"""
