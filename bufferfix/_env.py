"""Environment switches, parsed with the standard library only.

This module is imported on the interpreter start-up path (site hook), so it must
stay cheap and must never raise: a bad value gives one warning on stderr and the
safe default.
"""
import os
import sys

DISABLE = "BUFFERFIX_DISABLE"  # "1": never patch anything, even on `import bufferfix`
STRICT = "BUFFERFIX_STRICT"  # "1": an unrecoverable buffer raises instead of warning

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_already_complained = set()


def flag(name, default=False, environ=None):
    """Read a boolean switch leniently; never raises."""
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        return default
    normalised = value.strip().lower()
    if normalised in _TRUE:
        return True
    if normalised in _FALSE:
        return False
    if name not in _already_complained:
        _already_complained.add(name)
        sys.stderr.write(
            "bufferfix: ignoring %s=%r (expected 1/true/yes/on or 0/false/no/off); "
            "using %s\n" % (name, value, "1" if default else "0")
        )
    return default
