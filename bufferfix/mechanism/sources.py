"""Where a value comes from: the verdict on each way to recover one tensor.

In order: the old real value (``init_empty_weights()`` keeps buffers real), a snapshot
taken when the model went to meta, a registered recompute function, a replay of the
constructor of the module or of its nearest ancestor that reproduces it.  Each way that
fails leaves an :class:`~bufferfix.recovery.Attempt` saying why, as a value.
"""
import dataclasses

import torch

from ..recovery import Attempt, Reason, Source
from . import recipes, recompute, recording, snapshots


@dataclasses.dataclass
class Found:
    value: torch.Tensor | None  # None: not recovered
    source: Source | None = None
    origin: str | None = None
    attempts: tuple[Attempt, ...] = ()


def find(old, slots):
    """The value for ``old`` (the tensor before materialisation), held at ``slots``:
    ``[(module, name), ...]``, buffers first."""
    if not old.is_meta:
        return Found(old, Source.KEPT)  # real all along (init_empty_weights keeps buffers real)
    snapshot = snapshots.recall(old)
    if snapshot is not None:
        return Found(snapshot, Source.SNAPSHOT)
    attempts = []
    for module, name in slots:
        found = _recompute(module, name, old, attempts)
        if found is not None:
            return found
    return Found(None, attempts=tuple(dict.fromkeys(attempts)) or (Attempt(None, Reason.NO_RECIPE),))


def _recompute(module, name, live, attempts):
    tried = len(attempts)
    for owner, relative in recording.owners(module, name):
        reason = recompute.declared_unrecoverable(type(owner), relative)
        if reason is not None:  # the verdict replaces what nearer modules' replays said
            attempts[tried:] = [Attempt(_qualified_class(type(owner)), reason, relative)]
            return None
        function = recompute.registered_recompute(type(owner))
        if function is not None:  # the author's own recompute function comes first
            value = _call_recompute_function(function, owner, relative, attempts)
            if value is not None:
                return Found(value, Source.RECOMPUTE_FUNCTION, _qualified_class(type(owner)))
        recipe = recording.recipe_of(owner)
        if recipe is None:
            continue
        try:
            replayed, randomised = _replay(recipe, relative)
        except recipes.ReplayError as error:
            attempts.append(Attempt(recipe.origin, error.reason, error.detail))
            continue
        value = _lookup(replayed, relative)
        sub_path, _, leaf = relative.rpartition(".")
        if value is None:
            attempts.append(Attempt(recipe.origin, Reason.NOT_CREATED, relative))
        elif value.is_meta:
            attempts.append(Attempt(recipe.origin, Reason.ON_META))
        elif (sub_path, leaf) in randomised:
            attempts.append(Attempt(recipe.origin, Reason.RANDOM))
        elif _changed_after_construction(live, recipe, relative):
            attempts.append(Attempt(recipe.origin, Reason.MODIFIED_IN_PLACE))
        else:
            return Found(value, Source.REPLAY, recipe.origin)
    if len(attempts) == tried:
        attempts.append(Attempt(None, Reason.NO_RECIPE))
    return None


def _replay(recipe, relative):
    """The recipe's replay, with its parameters on meta; once more with real parameters when that
    gives the tensor on meta or raises, as a constructor does that computes a buffer from a
    parameter or on a parameter's device (timm's Swin ``attn_mask``, ``RotaryEmbeddingMixed``'s
    ``t_x``).  Raises :class:`~bufferfix.mechanism.recipes.ReplayError`."""
    try:
        replayed = recipes.replay(recipe)
    except recipes.ReplayError as error:
        if error.reason is not Reason.REPLAY_RAISED:
            raise  # refused / never_replay: real parameters change nothing
    else:
        value = _lookup(replayed[0], relative)
        if value is None or not value.is_meta:
            return replayed
    return recipes.replay(recipe, real_parameters=True)


def _qualified_class(cls):
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _call_recompute_function(function, owner, relative, attempts):
    try:
        computed = function(owner)
    except Exception as error:  # noqa: BLE001 - user code; report it
        attempts.append(Attempt(_qualified_class(type(owner)), Reason.RECOMPUTE_RAISED,
                                "%s: %s" % (type(error).__name__, error)))
        return None
    value = computed.get(relative) if computed is not None else None
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return value
    return None  # not covered by the function: constructor replay may still recover it


def _lookup(module, relative):
    sub_path, _, name = relative.rpartition(".")
    try:
        owner = module.get_submodule(sub_path) if sub_path else module
    except AttributeError:
        return None
    value = owner._buffers.get(name) if name in owner._buffers else vars(owner).get(name)
    return value if isinstance(value, torch.Tensor) else None


def _changed_after_construction(live, recipe, relative):
    """Did the live meta tensor see in-place writes after its constructor returned?"""
    version = recipes.effective_version(live)
    if not version:
        return False  # never written in place (cheap common case: no meta replay needed)
    at_construction = recipes.version_at_construction(recipe, relative)
    return at_construction is not None and version > at_construction
