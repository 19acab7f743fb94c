"""The mechanism: snapshot real values, record constructors, restore after materialisation.

Everything here needs torch; it is imported only once torch itself is imported.
"""

# See bufferfix/integrations/__init__.py: torch's post-import hook must not find a
# mechanism module half-initialised.
import torch  # noqa: E402,F401
