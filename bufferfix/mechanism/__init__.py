"""The mechanism: record constructors, snapshot real values, restore after materialisation.

One module per concern, dependencies running down the list; all of it produces
:class:`bufferfix.recovery.Recovery` values, and none of it makes words (see ``bufferfix.reporting``):

* ``restore``: plan before a materialisation, fill after it (faults included);
* ``deferral``: fills held back while a library's own initialisation runs;
* ``sources``: where a value comes from (kept, snapshot, recompute function, replay);
* ``recording``: which modules were built on meta, the module tree, record lifetimes;
* ``recipes``: a constructor call, interned, and its replay on CPU;
* ``snapshots``: real values kept when a model moves to meta;
* ``recompute``: the user's recompute functions and never-replay classes;
* ``compat``: every torch private API used, in one place.

Everything here needs torch; it is imported only once torch itself is imported.
"""

# See bufferfix/integrations/__init__.py: torch's post-import hook must not find a
# mechanism module half-initialised.
import torch  # noqa: F401
