"""The recovery loop: one value for the tensor held at some :class:`~.slots.Slot`\\ s, or why not.

Every kind of slot (buffer, plain attribute, tensor in a container, buffer the meta build lacks)
goes through the same steps, in this order:

1. the old value, if it is real (``init_empty_weights()`` keeps buffers real), unless its own
   constructor's replay shows it came from the random number generator;
2. a snapshot taken when the model was moved to meta;
3. for each module from the slot's own up through its ancestors: an integration's verdict that the
   value cannot exist, the user's registered recompute function, and a replay of the module's
   recorded constructor, with its parameters on meta, then once more with real parameters when that
   puts the value on meta or raises (a buffer computed from, or on the device of, a parameter).

A replay is used only where it is the constructor's call as it was: a value the replay draws from
the random number generator, a tensor changed in place after its constructor returned, and a
tensor put there by code outside any constructor (a plain or container attribute holding another
tensor than its module's constructor left, unless an ancestor's constructor put it there) are
named, never replayed.  Each way that fails
leaves an :class:`~bufferfix.recovery.Attempt` saying why, as a value.  (Attributes derived from
parameters get their values later, once the parameters hold values: see :mod:`.restore`.)
"""
from __future__ import annotations

import dataclasses

import torch

from ..recovery import Attempt, Reason, Source
from . import recipes, recompute, recording, snapshots
from .slots import BUFFER, Slot


@dataclasses.dataclass
class Found:
    value: torch.Tensor | None  # None: not recovered
    source: Source | None = None
    origin: str | None = None
    attempts: tuple[Attempt, ...] = ()
    replayed: torch.nn.Module | None = None  # the replayed module holding the value (an ABSENT slot's flags)


def find(old: torch.Tensor | None, slots: list[Slot]) -> Found:
    """The value for ``old`` (the tensor before materialisation; None for a buffer the meta build
    lacks), held at ``slots``, nearest-first."""
    if old is not None and not old.is_meta:
        return _kept(old, slots)
    if old is not None:
        snapshot = snapshots.taken.get(old)
        if snapshot is not None:
            return Found(snapshot, Source.SNAPSHOT)
    attempts: list[Attempt] = []
    replayable = old is None or not recording.set_outside_construction(old)
    if not replayable:  # a recompute function may still have it; no replay does
        attempts.append(Attempt(None, Reason.REPLACED, slots[0].label))
    not_its_own = old is not None and _not_left_by_constructor(old, slots)
    for slot in slots:
        found = _from_owners(slot, old, attempts, replayable, not_its_own)
        if found is not None:
            return found
    return Found(None, attempts=tuple(dict.fromkeys(attempts)) or (Attempt(None, Reason.NO_RECIPE),))


def _kept(old: torch.Tensor, slots: list[Slot]) -> Found:
    """A real value was kept: it stands, unless the constructor that made it, run with parameters
    on meta (``init_empty_weights()``), drew it from the random number generator: parameters
    made on meta draw nothing, so the stream was shifted and the value is not a normal build's.
    Written in place since, it stands only if no constructor is known to have made it (a tensor
    ``to_empty`` made, which the user wrote): one a constructor drew still holds that draw, or part
    of it.  A real tensor that user code put there stands."""
    if recording.set_outside_construction(old) or _not_left_by_constructor(old, slots):
        return Found(old, Source.KEPT)
    start = recording.constructed_by(old)
    drawn_by_constructor = recording.set_in_construction(old) or any(
        slot.kind != BUFFER and recording.left_by_constructor(slot.module, slot.name, slot.steps) is old
        for slot in slots)
    for slot in slots:
        owners = list(recording.owners(slot.module, ""))
        # Put there by an ancestor's constructor after its child's returned: only that one's replay has it.
        first = next((index for index, (owner, _) in enumerate(owners) if owner is start), 0)
        for owner, path in owners[first:]:
            recipe = recording.recipe_of(owner)
            if recipe is None:
                continue
            path = path.rstrip(".")
            try:
                replayed = recipes.replay(recipe)
            except recipes.ReplayError:
                return Found(old, Source.KEPT)
            holder = _submodule(replayed.module, path)
            if holder is None or slot.read(holder) is None:
                continue  # not made by this constructor: an ancestor's put it there
            if replayed.randomised(path, slot) and (
                    drawn_by_constructor or not _changed_after_construction(old, recipe, path, slot)):
                return Found(None, attempts=(Attempt(recipe.origin, Reason.RANDOM),))
            return Found(old, Source.KEPT)
    return Found(old, Source.KEPT)


def _not_left_by_constructor(old: torch.Tensor, slots: list[Slot]) -> bool:
    """Is ``old`` at none of ``slots`` where its module's constructor left a tensor, as far as
    known (see :func:`~.recording.left_by_constructor`; buffers have their own note)?"""
    known = False
    for slot in slots:
        if slot.kind == BUFFER:
            return False
        left = recording.left_by_constructor(slot.module, slot.name, slot.steps)
        if left is old:
            return False
        known = known or left is not recording.UNKNOWN
    return known


def _from_owners(slot: Slot, old: torch.Tensor | None, attempts: list[Attempt], replayable: bool,
                 not_its_own: bool = False) -> Found | None:
    """``not_its_own``: ``old`` is not what the slot's module's constructor left there, so only the
    replay of an ancestor whose constructor put another tensor there can have it."""
    tried = len(attempts)
    owners = [(owner, path.rstrip(".")) for owner, path in recording.owners(slot.module, "")]
    start = recording.constructed_by(old) if old is not None else None
    # Put there by an ancestor's constructor after its child's returned: only that one's replay has it.
    first_replay = next((index for index, (owner, _) in enumerate(owners) if owner is start), 0)
    if not_its_own:
        first_replay = max(first_replay, 1)
    for index, (owner, path) in enumerate(owners):
        relative = path + "." + slot.label if path else slot.label
        reason = recompute.declared_unrecoverable(type(owner), relative) if recompute.unrecoverable else None
        if reason is not None:  # the verdict replaces what nearer modules' replays said
            attempts[:] = [Attempt(_qualified_class(type(owner)), reason, relative)]
            return None
        function = recompute.registered_recompute(type(owner)) if recompute.recompute_functions else None
        if function is not None:  # the author's own recompute function comes first
            value = _call_recompute_function(function, owner, relative, attempts)
            if value is not None:
                return Found(value, Source.RECOMPUTE_FUNCTION, _qualified_class(type(owner)))
        recipe = recording.recipe_of(owner) if replayable and index >= first_replay else None
        if recipe is None:
            continue
        try:
            replayed = _replay(recipe, path, slot)
        except recipes.ReplayError as error:
            attempts.append(Attempt(recipe.origin, error.reason, error.detail))
            continue
        holder = _submodule(replayed.module, path)
        value = slot.read(holder) if holder is not None else None
        if value is None:
            attempts.append(Attempt(recipe.origin, Reason.NOT_CREATED, relative))
        elif not_its_own and holder is not None and recording.left_by_constructor(holder, slot.name, slot.steps) is value:
            # the ancestor's constructor left it as the module's own did: user code replaced it
            attempts.append(Attempt(None, Reason.REPLACED, slot.label))
        elif value.is_meta:
            attempts.append(Attempt(recipe.origin, Reason.ON_META))
        elif replayed.randomised(path, slot):
            attempts.append(Attempt(recipe.origin, Reason.RANDOM))
        elif old is not None and _changed_after_construction(old, recipe, path, slot):
            attempts.append(Attempt(recipe.origin, Reason.MODIFIED_IN_PLACE))
        else:
            return Found(value, Source.REPLAY, recipe.origin, replayed=holder)
    if not_its_own and len(attempts) == tried:  # no ancestor's replay has it either
        attempts.append(Attempt(None, Reason.REPLACED, slot.label))
    if len(attempts) == tried and replayable:
        attempts.append(Attempt(None, Reason.NO_RECIPE))
    return None


def _replay(recipe: recipes.Recipe, path: str, slot: Slot) -> recipes.Replayed:
    """The recipe's replay, with its parameters on meta; once more with real parameters when that
    gives the tensor on meta or raises, as a constructor does that computes a value from a
    parameter or on a parameter's device (timm's Swin ``attn_mask``, ``RotaryEmbeddingMixed``'s
    ``t_x``).  Raises :class:`~bufferfix.mechanism.recipes.ReplayError`."""
    try:
        replayed = recipes.replay(recipe)
    except recipes.ReplayError as error:
        if error.reason is not Reason.REPLAY_RAISED:
            raise  # refused / never_replay: real parameters change nothing
    else:
        holder = _submodule(replayed.module, path)
        value = slot.read(holder) if holder is not None else None
        if value is None or not value.is_meta:
            return replayed
    return recipes.replay(recipe, real_parameters=True)


def _submodule(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _qualified_class(cls: type) -> str:
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _call_recompute_function(function: recompute.RecomputeFunction, owner: torch.nn.Module, relative: str,
                             attempts: list[Attempt]) -> torch.Tensor | None:
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


def _changed_after_construction(live: torch.Tensor, recipe: recipes.Recipe, path: str, slot: Slot) -> bool:
    """Did the live meta tensor see in-place writes after its constructor returned?"""
    version = recipes.effective_version(live)
    if not version:
        return False  # never written in place (cheap common case: no meta replay needed)
    at_construction = recipes.version_at_construction(recipe, path, slot)
    return at_construction is not None and version > at_construction
