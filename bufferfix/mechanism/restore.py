"""Restore: put the right values into every tensor slot around a materialisation.

A :class:`Materialisation` is built *before* tensors are swapped for empty memory (``to_empty``,
or a library's own equivalent) and :meth:`Materialisation.restore` runs *after*.  Before, it notes
every tensor that may need a value, as :class:`~.slots.Slot`\\ s grouped by the tensor they hold:
non-persistent buffers, plain tensor attributes, tensors inside container attributes, buffers the
meta build lacks, and which of those are views or aliases of another tensor (a parameter
included).  After, it

* re-shares tensors that were shared, and makes views views again (``empty_like`` gave each slot
  memory of its own);
* fills each group from the first source that has its value (one loop for every kind of slot:
  :func:`.sources.find`);
* holds an attribute derived from parameters (the legacy ``weight_norm``'s and ``spectral_norm``'s
  ``weight``) until the parameters hold values, and names it when they were cast after it was
  derived (a normal build keeps the value from before the cast);
* holds the verdict on every value it could not recover until loading ends (:func:`settle`):
  code that rewrites such a tensor before then (a model's own ``reset_parameters()``) leaves
  nothing to report.

Values are copied into the materialised tensor, so it keeps the dtype and device the
materialisation gave it (exactly what ``.to()`` would do to a normal build).

**Faults.**  When the materialising call raises part of the way through (a device
out-of-memory error), :meth:`Materialisation.restore_after_error` fills what was
materialised before the error, so nothing already swapped for empty memory is left
looking like a value.  Every materialised tensor is marked *unfilled* until its value
is written; a later materialisation that finds a mark (the fill was interrupted, or the
value could not be recovered) plans it as the meta tensor it replaced, so a retry fills
it or names it again instead of keeping garbage as a "real value".  A mark goes when the
value is written, by bufferfix or in place by anyone else.
"""
from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..recovery import Attempt, Reason, Recovery, Source
from . import compat, deferral, recipes, recompute, recording, slots, snapshots, sources
from .slots import ABSENT, ATTRIBUTE, BUFFER, Slot

logger = logging.getLogger("bufferfix")

# A tensor shared by several modules that are materialised one call at a time (FSDP1's
# param_init_fn calls to_empty(recurse=False) per module) must end up shared again, and a view of it
# a view of it again: what each call gives a slot is remembered, keyed weakly by the tensor it replaced,
# and held weakly too: an unfilled mark holds that replaced tensor, so a strong value here would keep
# both alive for ever.
_materialised = compat.WeakIdKeyDictionary()
# Materialised tensor whose value was not written yet -> (the tensor it replaced, its version then).
_unfilled = compat.WeakIdKeyDictionary()
# Snapshots that a materialisation made a buffer again (each only once: a copy of the meta model has them too).
_claimed = compat.WeakIdKeyDictionary()


class _Group:
    """One tensor and every slot that held it before materialisation."""

    __slots__ = ("tensor", "old", "slots", "needs_value", "view", "viewers", "derived")

    def __init__(self, tensor: torch.Tensor | None) -> None:
        self.tensor = tensor  # what the slots held before materialisation (None: an ABSENT buffer)
        self.old = tensor  # where the value comes from: ``tensor``, or the meta tensor it stands in for
        self.slots: list[Slot] = []  # buffers first (the materialised buffer is the target)
        self.needs_value = False
        self.view: tuple[Any, ...] | None = None  # (base, size, stride, offset from the base's): a view of base
        self.viewers: list[_Group] = []  # groups planned as views of this one: their values are its
        self.derived: Any = None  # the forward pre-hook computing it from parameters

    @property
    def buffers(self) -> list[Slot]:
        return [slot for slot in self.slots if slot.kind == BUFFER]


_SAYS_LITTLE = (Reason.NOT_CREATED, Reason.NO_RECIPE)


def _qualified(path: str, name: str) -> str:
    return "%s.%s" % (path, name) if path else name


# Types seen as module attributes that are not tensors (bool, dict, set, configs, ...): a module
# whose attributes all have such types holds no tensor attribute, which set.issuperset decides in C.
_NON_TENSOR_TYPES: set[type] = set()


def _any_tensor(tensor: torch.Tensor) -> bool:
    return True


def _modules_in_order(root: torch.nn.Module) -> list[torch.nn.Module]:
    """``root.modules()`` (pre-order, each module once), without nested generators."""
    found: dict[int, torch.nn.Module] = {}
    pending: list[torch.nn.Module | None] = [root]
    while pending:
        module = pending.pop()
        if module is not None and id(module) not in found:
            found[id(module)] = module
            pending.extend(reversed(module._modules.values()))
    return list(found.values())


def _remember_non_tensor_type(kind: type) -> None:
    if len(_NON_TENSOR_TYPES) > 10000:  # e.g. classes made on the fly: do not keep them all alive
        _NON_TENSOR_TYPES.clear()
    _NON_TENSOR_TYPES.add(kind)


def left_unfilled(tensor: torch.Tensor) -> torch.Tensor | None:
    """The meta tensor ``tensor`` replaced, if its value was never written; else None."""
    mark = _unfilled.get(tensor)
    if mark is None:
        return None
    if recipes.raw_version(tensor) != mark[1]:  # written in place since: its value stands
        del _unfilled[tensor]
        return None
    return mark[0]


def _earlier(group: _Group) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(shared, earlier)``: ``earlier``, what an earlier materialisation gave the tensor ``group``
    holds or the tensor it is a view of, and ``shared``, that tensor or the view of it made again.
    None if there is none, or it cannot be shared (typed or placed unlike this materialisation's
    buffer, laid out afresh)."""
    tensor = group.tensor
    if tensor is None or group.derived is not None:
        return None
    base, ref = tensor, _materialised.get(tensor)
    if ref is None and tensor._base is not None:
        base = tensor._base
        ref = _materialised.get(base)
    earlier: torch.Tensor | None = ref() if ref is not None else None
    if earlier is None:
        return None
    slot = group.buffers[0] if group.buffers else None
    like = slot.module._buffers[slot.name] if slot is not None else None
    if earlier.dtype != (like if like is not None else tensor).dtype or (like is not None and like.device != earlier.device):
        return None
    if base is tensor:
        return earlier, earlier
    offset = slots.within(tensor, base)
    if offset is None or earlier.stride() != base.stride():
        return None
    return earlier.as_strided(tensor.shape, tensor.stride(), earlier.storage_offset() + offset), earlier


def derived_by(module: torch.nn.Module, name: str) -> Any:
    """The legacy ``torch.nn.utils.weight_norm`` or ``spectral_norm`` forward pre-hook that derives
    the plain attribute ``module.name`` from parameters (and recomputes it at every forward), or None."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (WeightNorm, SpectralNorm)) and hook.name == name:
            return hook
    return None


def _derived_from(hook: Any) -> tuple[str, ...]:
    """The names of the parameters ``hook`` derives its attribute from."""
    return tuple(hook.name + suffix for suffix in (("_orig",) if isinstance(hook, SpectralNorm) else ("_g", "_v")))


def _derive(hook: Any, module: torch.nn.Module) -> torch.Tensor:
    """What the constructor left in the attribute, from the parameters as they are now: the value
    ``weight_norm`` computes from them; ``spectral_norm``'s parameter's data (its storage shared)."""
    if isinstance(hook, SpectralNorm):
        parameter = module._parameters[hook.name + "_orig"]
        assert parameter is not None  # spectral_norm registered it
        return parameter.data
    derived: torch.Tensor = hook.compute_weight(module)
    return derived


class Materialisation:
    def __init__(self, root: torch.nn.Module, recurse: bool = True) -> None:
        # Runs over every module of the model at every materialisation: module paths (only needed
        # to name a buffer in a message) are worked out later, and only if asked for.
        recording.follow_moved_attributes()
        self.root, self.recurse = root, recurse
        self.modules = _modules_in_order(root) if recurse else [root]
        self.root_was_meta = recording.holds_meta_tensors(root) if not recurse else True
        self._paths: dict[int, str] | None = None
        self.recovered: list[Recovery] = []  # Recovery of each value filled, kept only while debug logging is on
        self.groups: dict[Any, _Group] = {}
        for module in self.modules:
            if not module._buffers:
                continue
            non_persistent = module._non_persistent_buffers_set
            for name, tensor in module._buffers.items():
                if tensor is not None:
                    group = self._group(tensor)
                    group.slots.append(Slot(module, BUFFER, name))
                    if name in non_persistent:
                        group.needs_value = True
        for module in self.modules:
            attributes = vars(module)
            if _NON_TENSOR_TYPES.issuperset(map(type, attributes.values())):
                continue  # the common case, decided in C
            for name, value in attributes.items():
                if not isinstance(value, torch.Tensor):
                    _remember_non_tensor_type(type(value))
                elif not isinstance(value, torch.nn.Parameter):
                    group = self._group(value)
                    group.slots.append(Slot(module, ATTRIBUTE, name))
                    if value.is_meta and len(group.slots) == 1:
                        group.needs_value = True
                        if module._forward_pre_hooks:
                            group.derived = derived_by(module, name)
        self._plan_containers_and_absent_buffers()
        if _unfilled:
            self._plan_unfilled()
        bases = self._plan_views()
        # A module materialised without its children (recurse=False) keeps every tensor: another
        # call, for another module, may materialise a tensor sharing its storage.  So does a
        # persistent buffer with a snapshot: a plain or container attribute holds the real tensor it
        # stands for, or a view of it.
        taken = snapshots.taken
        self.groups = {key: group for key, group in self.groups.items()
                       if group.needs_value or group.view is not None or len(group.slots) > 1 or key in bases
                       or any(slot.kind != BUFFER for slot in group.slots) or not recurse
                       or (taken and group.tensor is not None and group.tensor in taken)}
        self._holding = False  # verdicts wait until loading ends (restore), or are given now (after an error)

    def _plan_containers_and_absent_buffers(self) -> None:
        """Tensors in container attributes (only modules built on meta, or never recorded, can hold
        them on meta; a real one there may have been drawn at random with parameters on meta, as an
        attribute may) and the buffers an integration says a module's constructor registers only off
        meta (``recompute.expect_buffers``)."""
        if not recording.has_any() and not any(recording.unrecordable(type(m)) for m in self.modules):
            return
        empty: dict[int, int] = {}  # objects holding no meta tensor, walked once for all modules
        for module in self.modules:
            if not (recording.was_recorded(module) or recording.unrecordable(type(module))):
                continue
            for slot, tensor in slots.items(module, _any_tensor, empty=empty):
                group = self._group(tensor)
                group.slots.append(slot)
                group.needs_value = True
            if recompute.expecting and recompute.expects_buffers(type(module)) and recording.was_recorded(module):
                self._plan_absent_buffers(module)

    def _plan_unfilled(self) -> None:
        """A tensor that an earlier materialisation left unfilled (interrupted, or its value not
        recovered), in any slot, is planned as the meta tensor it replaced: filled or named again."""
        for group in self.groups.values():
            stands_for = left_unfilled(group.tensor) if group.tensor is not None else None
            if stands_for is None:
                continue
            group.old, group.needs_value = stands_for, True
            first = group.slots[0]
            if first.kind == ATTRIBUTE and group.derived is None and first.module._forward_pre_hooks:
                group.derived = derived_by(first.module, first.name)

    def _plan_absent_buffers(self, module: torch.nn.Module) -> None:
        recipe = recording.recipe_of(module)
        assert recipe is not None  # planned only for a module recorded (was_recorded)
        try:
            replayed = recipes.replay(recipe).module
        except recipes.ReplayError:  # the fill replays again and names the reason
            names = [("<buffers registered off meta>", False)]
        else:
            names = [(name, name not in replayed._non_persistent_buffers_set)
                     for name, value in replayed._buffers.items()
                     if value is not None and name not in module._buffers and name not in vars(module)]
        for name, persistent in names:
            group = self.groups[(ABSENT, id(module), name)] = _Group(None)
            group.slots.append(Slot(module, ABSENT, name, persistent=persistent))
            group.needs_value = True

    def _plan_views(self) -> set[Any]:
        """A tensor sharing storage with another (a view of a buffer, ``spectral_norm``'s ``weight``
        aliasing its parameter) is made a view of that one's materialised tensor again.  Returns the
        keys of the groups viewed."""
        bases: set[Any] = set()
        # id(storage) -> (where its first tensor sits, that tensor, the storage: held, so no id is reused).
        # torch keeps one Python object per storage, meta ones included, for as long as it lives.
        by_storage: dict[int, tuple[Any, torch.Tensor, Any]] = {}
        for module in self.modules:
            for name, param in module._parameters.items():
                storage = slots.storage(param) if param is not None else None
                if param is not None and storage is not None:
                    by_storage.setdefault(id(storage), (("parameter", module, name), param, storage))
        candidates = [(key, group, group.tensor) for key, group in self.groups.items() if group.tensor is not None]
        unplanned = self._plan_views_among(candidates, dict(by_storage), bases)
        # Views of a tensor that no slot holds (replaced after they were made), not views of each other:
        # planned again, as views of memory laid out as that tensor was.
        unheld = {id(t._base): t._base for t in unplanned if t._base is not None and id(t._base) not in self.groups
                  and not isinstance(t._base, torch.nn.Parameter)}
        if unheld:
            for group in self.groups.values():
                group.view, group.viewers = None, []
            bases.clear()
            candidates += [(key, self.groups.setdefault(key, _Group(tensor)), tensor) for key, tensor in unheld.items()]
            self._plan_views_among(candidates, by_storage, bases)
        return bases

    def _plan_views_among(self, candidates: list[tuple[Any, _Group, torch.Tensor]],
                          by_storage: dict[int, tuple[Any, torch.Tensor, Any]], bases: set[Any]) -> list[torch.Tensor]:
        """Plans each candidate sharing storage with an earlier one as a view of it; returns the
        tensors that share storage beyond what that one covers (filled on their own)."""
        unplanned = []
        for key, group, tensor in sorted(candidates, key=lambda entry: entry[2]._base is not None):
            storage = slots.storage(tensor)
            if storage is None:
                continue  # no memory another tensor can share
            base = by_storage.get(id(storage))
            if base is None:
                by_storage[id(storage)] = (("group", key), tensor, storage)
                continue
            base_location, base_tensor, _ = base
            offset = slots.within(tensor, base_tensor)
            if offset is None:
                unplanned.append(tensor)
                continue  # shares memory beyond what the base covers: filled on its own
            group.view = (base_location, tuple(tensor.shape), tensor.stride(), offset)
            if base_location[0] == "group":
                bases.add(base_location[1])
                self.groups[base_location[1]].viewers.append(group)
        return unplanned

    def _path(self, module: torch.nn.Module) -> str:
        if self._paths is None:
            if self.recurse:
                self._paths = {id(sub): path for path, sub in self.root.named_modules(remove_duplicate=False)}
            else:  # one module of a model materialised module by module: name it by where it was built
                self._paths = {id(self.root): recording.recorded_path(self.root)}
        return self._paths.get(id(module), "")

    def _group(self, tensor: torch.Tensor) -> _Group:
        group = self.groups.get(id(tensor))
        if group is None:
            group = self.groups[id(tensor)] = _Group(tensor)
        return group

    # ------------------------------------------------------------------ after
    def restore(self, device: torch.device | None = None,
                defer_replays: bool = False) -> tuple[deferral.DeferredRestore | None, list[Recovery]]:
        """Fill every slot that needs a value.  With ``defer_replays``, values that only a replay can
        give are held back in a :class:`~.deferral.DeferredRestore`.  Returns ``(DeferredRestore or
        None, [Recovery of each value not recovered])``."""
        failures: list[Recovery] = []
        held_back: list[tuple[_Group, torch.Tensor]] = []
        self._holding = True
        with torch.no_grad():
            for group, target in self._materialised_groups():
                if defer_replays and self._only_a_replay_can_fill(group, target):
                    assert target is not None  # only a real target is left to a replay
                    held_back.append((group, target))
                    continue
                self.fill(group, target, failures, device)
        if held_back:
            return deferral.DeferredRestore(self, held_back, failures), []
        return None, self.finish(failures)

    def restore_after_error(self, device: torch.device | None = None) -> list[Recovery]:
        """The materialising call raised part of the way through: fill every slot it had already
        swapped for empty memory (the rest still holds meta tensors, which fail loudly when used
        and are filled by the next materialisation).  Records are kept for that retry.  Returns
        the Recovery of each value not recovered."""
        failures: list[Recovery] = []
        with torch.no_grad():
            for group, target in self._materialised_groups(changed_only=True):
                self.fill(group, target, failures, device)
        return failures

    def _materialised_groups(self, changed_only: bool = False) -> list[tuple[_Group, torch.Tensor | None]]:
        """``[(group, target)]`` for every group that needs a value, after re-sharing, views after
        the tensors they view.  Every real target is marked unfilled, all of them before any is
        filled, until :meth:`fill` writes it."""
        pending = []
        targets: dict[Any, torch.Tensor | None] = {}
        for key, group in sorted(self.groups.items(), key=lambda pair: pair[1].view is not None):
            if changed_only and not self._changed(group):
                continue
            target = targets[key] = self._reshare(group, targets)
            if target is not None and group.tensor is not None and target is not group.tensor and not target.is_meta:
                _materialised[group.tensor] = weakref.ref(target)
            if group.tensor is not None and not group.tensor.is_meta and not group.buffers:
                # A real attribute: it needs its value back if materialisation replaced it, and a
                # verdict if its constructor ran with parameters on meta (a random value drawn
                # after them is not a normal build's: see sources).
                group.needs_value = group.needs_value or any(
                    slot.read() is not group.tensor or recording.was_recorded(slot.module) for slot in group.slots)
            if group.needs_value:
                pending.append((group, target))
        for group, target in pending:
            if target is not None and not target.is_meta:
                _unfilled[target] = (group.old, recipes.raw_version(target))
        return pending

    @staticmethod
    def _changed(group: _Group) -> bool:
        return group.tensor is None or any(slot.read() is not group.tensor for slot in group.slots)

    @staticmethod
    def _only_a_replay_can_fill(group: _Group, target: torch.Tensor | None) -> bool:
        return (target is not None and not target.is_meta and group.old is not None and group.old.is_meta
                and group.view is None and group.derived is None and snapshots.taken.get(group.old) is None)

    def fill(self, group: _Group, target: torch.Tensor | None, failures: list[Recovery],
             device: torch.device | None = None) -> None:
        """Give ``group`` its value in ``target``; what cannot be recovered goes into ``failures``."""
        if group.derived is not None:
            cast = self._cast_since_derived(group)
            if cast is None:
                _hold_derived(group)
            else:
                self._fail(group, target, sources.Found(None, attempts=(cast,)), failures)
            return
        if group.view is not None and target is None:  # a view of a value placed before it
            if self._view_of_placed(group):
                return
            group.view = None  # filled on its own
        found = sources.find(group.old, group.slots)
        if found.value is None:
            self._fail(group, target, found, failures)
            return
        if logger.isEnabledFor(logging.DEBUG):
            self.recovered.append(self._recovery(group, found))
        if found.value is group.old and all(slot.read() is group.old for slot in group.slots):
            return  # kept where it was
        if target is None:
            self._place(group, found, device)
            return
        if tuple(found.value.shape) != tuple(target.shape):
            self._fail(group, target, sources.Found(None, attempts=(Attempt(
                found.origin, Reason.SHAPE_MISMATCH, "%s vs %s" % (tuple(found.value.shape), tuple(target.shape))),)),
                failures)
            return
        self._write(group, target, found.value)

    @staticmethod
    def _cast_since_derived(group: _Group) -> Attempt | None:
        """Were the parameters of a derived attribute cast to another dtype after it was derived
        (``.to(torch.bfloat16)`` on meta)?  Then a normal build holds the value derived from them
        before the cast, which no checkpoint has: why, as an Attempt; else None."""
        slot = group.slots[0]
        assert group.old is not None  # a plain attribute planned
        names = _derived_from(group.derived)
        dtypes = {parameter.dtype for parameter in map(slot.module._parameters.get, names) if parameter is not None}
        if dtypes <= {group.old.dtype}:
            return None
        return Attempt(None, Reason.CAST_AFTER_DERIVED, "%s (%s, now %s)" % (
            " / ".join(names), group.old.dtype, " / ".join(sorted(map(str, dtypes)))))

    def _fail(self, group: _Group, target: torch.Tensor | None, found: sources.Found,
              failures: list[Recovery]) -> None:
        # A view made again of this tensor holds what it holds: named with it.
        viewers = [viewer for viewer in group.viewers if viewer.view is not None]
        # Loading writes the persistent buffers among these (a view loaded is not named): it rewrites
        # the tensor only if one of them covers it whole.
        loaded = [viewer for viewer in [group] + viewers if any(
            slot.kind == BUFFER and slot.name not in slot.module._non_persistent_buffers_set for slot in viewer.slots)]
        loaded_whole = target is not None and any(
            viewer.view is None or math.prod(viewer.view[1]) == target.numel() for viewer in loaded)
        for failed in [group] + [viewer for viewer in viewers if viewer not in loaded]:
            failures.append(self._recovery(failed, found))
            if self._holding:
                held = [(slot, slot.read()) for slot in failed.slots]
                _unsettled.append(_Held(failures[-1], held, target,
                                        recipes.raw_version(target) if target is not None else 0, loaded_whole))

    def _place(self, group: _Group, found: sources.Found, device: torch.device | None) -> None:
        """No materialised tensor to copy into: the slots take the value itself.  A plain attribute
        goes to the materialisation's device; a tensor in a container stays where its constructor
        put it (``to_empty`` and ``.to()`` never touch those); both keep the dtype the live tensor
        had (a module whose ``_apply`` casts its attributes cast it on meta too).  A buffer the meta
        build lacked is registered on the device of the module's materialised tensors."""
        value = found.value
        assert value is not None
        kinds = {slot.kind for slot in group.slots}
        if ABSENT in kinds:
            where = device if device is not None else _device_of(group.slots[0].module)
            value = value.to(where, copy=True)
        else:
            where = device if device is not None and ATTRIBUTE in kinds else value.device
            dtype = group.old.dtype if group.old is not None else value.dtype
            value = value.to(device=where, dtype=dtype, copy=True)
            if group.viewers and group.old is not None and value.stride() != group.old.stride():
                # laid out afresh (an expanded tensor comes back contiguous): its views need the old layout
                laid = torch.empty_strided(group.old.shape, group.old.stride(), dtype=value.dtype, device=value.device)
                try:
                    _copy(laid, value)
                    value = laid
                except RuntimeError:
                    pass  # its views are filled on their own
        for slot in group.slots:
            slot.write(value, found.replayed)
        if group.tensor is not None:
            _materialised[group.tensor] = weakref.ref(value)

    def finish(self, failures: list[Recovery]) -> list[Recovery]:
        """The materialisation is complete: records go; returns ``failures``.  After a failure the
        records stay (until the model dies), so a retry can still replay."""
        if failures:
            pass
        elif self.recurse:
            recording.forget_all(self.modules)
        else:
            recording.forget_when_subtree_done(self.root, self.root_was_meta)
        return failures

    def _reshare(self, group: _Group, targets: dict[Any, torch.Tensor | None]) -> torch.Tensor | None:
        """Make every slot of the group hold the same (materialised) tensor again, a view of its base
        if it was one; returns that tensor (None when no slot was materialised)."""
        if group.view is not None:
            target = self._view_target(group, targets)
            if target is not None:
                for slot in group.slots:
                    slot.write(target)
                location = group.view[0]
                if location[0] == "parameter" or location[1] not in self.groups or self.groups[location[1]].slots:
                    group.needs_value = False  # its values are its base's (a base no slot holds has none)
                return target
            if self._base_placed(group):
                return None  # made a view of its base's value once that is placed (fill)
            group.view = None  # its base was not materialised: filled on its own
        shared = _earlier(group)
        if shared is not None:  # materialised by an earlier call, with another module's slot
            target, earlier = shared
            for slot in group.slots:
                if slot.read() is not target:
                    slot.write(target)
            if earlier not in _unfilled or self._held_with(group, target, earlier):
                group.needs_value = False  # filled by the earlier call, or its verdict is this one's
            return target
        if not group.slots:  # the base of views, that no slot holds
            return self._unheld_base(group)
        if not group.buffers:
            if group.tensor is None:
                return None
            changed = [slot.read() for slot in group.slots if slot.kind == ATTRIBUTE]
            replaced = next((t for t in changed if t is not None and t is not group.tensor and not t.is_meta), None)
            if replaced is not None:
                # the module's own _apply materialised its attribute; the real tensor a move to meta took
                # it from, if any, is the attribute again: what shares its memory shares it
                real = self._claim_snapshot(group, replaced)
                target = replaced if real is None else real
            elif group.viewers and group.tensor.is_meta:
                # buffers that are views of it were materialised: it gets memory where they are, to share
                memory = self._unheld_base(group)
                if memory is None:
                    return None
                target = memory
            else:
                return None  # nothing materialised it: the slots take the value itself (_place)
        else:
            slot = group.buffers[0]
            target = slot.module._buffers[slot.name]
            assert target is not None  # a buffer planned: materialisation puts a tensor there, never None
            if not target.is_meta and target is not group.tensor:
                old = group.tensor
                real = self._claim_snapshot(group, target)
                if real is not None:
                    # the real tensor the move to meta took it from, here again: what shared its memory
                    # (a list or dict attribute the move left real) shares it again, as in a normal build
                    target = real
                elif group.viewers and old is not None and target.stride() != old.stride() and not any(
                        other.kind == BUFFER and other.name not in other.module._non_persistent_buffers_set
                        for other in group.slots):
                    # laid out afresh (an expanded tensor comes back contiguous): its views need the old
                    # layout (a persistent buffer keeps the new one: loading cannot write an expanded tensor)
                    target = torch.empty_strided(old.shape, old.stride(), dtype=target.dtype, device=target.device)
        for other in group.slots:
            if other.read() is not target:
                other.write(target)
        return target

    def _held_with(self, group: _Group, target: torch.Tensor, earlier: torch.Tensor) -> bool:
        """``earlier``, which ``target`` is or views, is held unfilled by an earlier call until loading
        ends: ``group`` joins its verdict (named with it, and a persistent buffer of ``group`` that is
        all of it, which loading writes, rewrites it).  False if no verdict on it is held."""
        indices = [index for index, held in enumerate(_unsettled) if held.target is earlier]
        if not indices or not self._holding:
            return False
        if target is earlier and any(slot.kind == BUFFER and slot.name not in slot.module._non_persistent_buffers_set
                                     for slot in group.slots):
            for index in indices:
                _unsettled[index] = _unsettled[index]._replace(loaded_whole=True)
        if group.needs_value:
            held = _unsettled[indices[0]]
            found = sources.Found(None, origin=held.recovery.origin, attempts=held.recovery.attempts)
            _unsettled.append(held._replace(recovery=self._recovery(group, found),
                                            slots=[(slot, slot.read()) for slot in group.slots]))
        return True

    @staticmethod
    def _claim_snapshot(group: _Group, target: torch.Tensor) -> torch.Tensor | None:
        """The real tensor a move to meta replaced with ``group``'s meta tensor, if it can stand for
        ``target`` (laid out as that meta tensor, typed and placed as ``target``) and no
        materialisation took it yet (a copy of the meta model has the same snapshot): taken now."""
        if not snapshots.taken or group.old is None or not group.old.is_meta:
            return None
        real = snapshots.taken.get(group.old)
        if real is None or real in _claimed or real.dtype != target.dtype or real.device != target.device \
                or real.shape != group.old.shape or real.stride() != group.old.stride() or real.requires_grad:
            return None
        _claimed[real] = True
        return real

    @staticmethod
    def _unheld_base(group: _Group) -> torch.Tensor | None:
        """Memory for a tensor that no materialisation replaces (no slot holds it, or only plain and
        container attributes do), laid out and typed as it was, where the buffers that are views of it
        were materialised (None if none was)."""
        assert group.tensor is not None
        for slot in (slot for viewer in group.viewers for slot in viewer.buffers):
            done = slot.module._buffers[slot.name]
            if done is not None and not done.is_meta and not any(done is viewer.tensor for viewer in group.viewers):
                return torch.empty_strided(group.tensor.shape, group.tensor.stride(), dtype=group.tensor.dtype,
                                           device=done.device)
        return None

    def _base_placed(self, group: _Group) -> bool:
        """Is ``group`` a view of a tensor no materialisation replaces, that takes its value itself
        (:meth:`_place`: a plain attribute, a tensor in a container, on meta)?"""
        assert group.view is not None
        location = group.view[0]
        base = self.groups.get(location[1]) if location[0] == "group" else None
        return (base is not None and base.tensor is not None and base.tensor.is_meta and not base.buffers
                and bool(base.slots))

    def _view_of_placed(self, group: _Group) -> bool:
        """Make ``group`` a view of its base's placed value; True if done, or if the base has no value
        (then it is named with its base); False if it is to be filled on its own (its base is laid
        out afresh, or derived from parameters later)."""
        assert group.view is not None
        location, size, stride, offset = group.view
        planned = self.groups[location[1]]
        base = planned.slots[0].read()
        if base is None or base.is_meta:
            return planned.derived is None
        assert planned.tensor is not None
        if base.stride() != planned.tensor.stride():
            return False
        view = base.as_strided(size, stride, base.storage_offset() + offset)
        for slot in group.slots:
            slot.write(view)
        return True

    def _view_target(self, group: _Group, targets: dict[Any, torch.Tensor | None]) -> torch.Tensor | None:
        assert group.view is not None
        location, size, stride, offset = group.view
        if location[0] == "parameter":
            base = location[1]._parameters.get(location[2])
        else:
            base = targets.get(location[1])
            planned = self.groups[location[1]].tensor if location[1] in self.groups else None
            if base is not None and planned is not None and base.stride() != planned.stride():
                return None  # laid out afresh: filled on its own
        if base is None or base.is_meta or (group.tensor is not None and base.dtype != group.tensor.dtype):
            return None  # not materialised, or of another dtype (a checkpoint's, assigned): filled on its own
        try:
            return base.as_strided(size, stride, base.storage_offset() + offset)
        except RuntimeError:
            return None

    @staticmethod
    def _write(group: _Group, target: torch.Tensor, value: torch.Tensor) -> None:
        if target.is_meta:
            return  # still on meta (e.g. to_empty(device="meta")): nothing to fill
        if value is target:  # the snapshot itself is the materialised tensor
            _unfilled.pop(target, None)
            return
        try:
            _copy(target, value)
            _unfilled.pop(target, None)
        except RuntimeError:
            # An expanded target (stride 0) that cannot take the value: swap the tensor.
            _unfilled.pop(target, None)
            replacement = value.to(device=target.device, dtype=target.dtype, copy=True)
            for slot in group.slots:
                slot.write(replacement)

    @staticmethod
    def left_to_the_library(target: torch.Tensor) -> None:
        """The library's own initialisation overwrites ``target`` whole: its value stands."""
        _unfilled.pop(target, None)

    def _recovery(self, group: _Group, found: sources.Found) -> Recovery:
        slot = group.slots[0]
        attempts = found.attempts
        # The reason is the first attempt that met the value: a nearer module whose constructor does
        # not create it (an ancestor's put it there) says less than the ancestor's replay.
        primary = next((attempt for attempt in attempts if attempt.reason not in _SAYS_LITTLE),
                       attempts[0] if attempts else None)
        return Recovery(
            name=_qualified(self._path(slot.module), slot.label), owner=type(slot.module).__qualname__,
            kind="buffer" if slot.kind in (BUFFER, ABSENT) else "attribute", source=found.source,
            origin=found.origin, reason=primary.reason if found.source is None and primary else None,
            detail=primary.detail if found.source is None and primary else "", attempts=attempts)

    def explain(self) -> list[Recovery]:
        """A :class:`~bufferfix.recovery.Recovery` for every tensor that needs a value; changes nothing."""
        found = []
        for group in self.groups.values():
            if not group.needs_value or group.view is not None:
                continue
            if group.derived is not None:
                found.append(self._recovery(group, sources.Found(None, Source.DERIVED)))
            else:
                found.append(self._recovery(group, sources.find(group.old, group.slots)))
        return found


def _copy(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)``; an expanded ``target`` (stride 0) takes it in its memory, if ``value`` is
    expanded as it is.  Raises RuntimeError if it cannot."""
    memory = slots.dense(target)
    if memory is target:
        target.copy_(value)
        return
    part = value[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in target.stride())]
    if not torch.equal(part.expand_as(value), value):
        raise RuntimeError("the value is not expanded as its target is")
    memory.copy_(part)


def _device_of(module: torch.nn.Module) -> torch.device:
    """Where the module's materialised tensors are (for a buffer added to a module that had none)."""
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- when loading ends

class _Held(NamedTuple):
    """A value not recovered at materialisation, whose verdict waits until loading ends."""

    recovery: Recovery
    slots: list[tuple[Slot, torch.Tensor | None]]  # its slots, with what each held then
    target: torch.Tensor | None  # the materialised tensor
    version: int  # that tensor's version then (minus the writes loading made since)
    loaded_whole: bool  # a persistent buffer loading writes is this tensor, or a view of all of it


_unsettled: list[_Held] = []
_derived: list[tuple[Any, torch.nn.Module, str]] = []  # (hook, module, attribute) waiting for parameters


def _hold_derived(group: _Group) -> None:
    slot = group.slots[0]
    _derived.append((group.derived, slot.module, slot.name))


def unsettled() -> bool:
    """Is anything waiting for loading to end?"""
    return bool(_unsettled or _derived)


def settle() -> list[Recovery]:
    """Loading has ended (a ``load_state_dict`` returned, a library's loading finished, or the
    first forward started): attributes derived from parameters get their values, and every value
    not recovered at materialisation that nothing has rewritten since is returned, to be reported.
    A tensor rewritten in place, or replaced by the model's own code, is not."""
    derived, _derived[:] = list(_derived), []
    with torch.no_grad():
        for hook, module, name in derived:
            if any(p is not None and p.is_meta for p in module._parameters.values()):
                continue  # its parameters never got values: it stays on meta, which fails loudly
            module.__dict__[name] = _derive(hook, module)
    held, _unsettled[:] = list(_unsettled), []
    failures = []
    for recovery, held_slots, target, version, _ in held:
        rewritten = (target is not None and not target.is_meta and recipes.raw_version(target) != version) or any(
            (current := slot.read()) is not then and current is not None and not current.is_meta
            for slot, then in held_slots)
        if not rewritten:
            failures.append(recovery)
    return failures


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Around a checkpoint's loading: it writes persistent buffers, and one that is a view of part
    of a value not recovered writes only that part, which does not make the value whole.  Such
    writes are not counted as rewriting it (the model's own code rewriting it in place is)."""
    before = {id(held): recipes.raw_version(held.target) for held in _unsettled
              if held.target is not None and not held.loaded_whole}
    try:
        yield
    finally:
        for index, held in enumerate(_unsettled):
            if id(held) in before:
                assert held.target is not None
                loaded = recipes.raw_version(held.target) - before[id(held)]
                _unsettled[index] = held._replace(version=held.version + loaded)


def unfilled_count() -> int:
    return len(_unfilled)


def materialise_meta_buffers(model: torch.nn.Module, device: torch.device | str = "cpu",
                             plan: Materialisation | None = None) -> Materialisation:
    """Give every non-persistent buffer (and plain tensor attribute) still on meta its value on
    ``device``, leaving everything else alone.  For libraries that load parameters themselves
    and never materialise what is not in the checkpoint (accelerate's dispatch and loading).
    Returns the plan (its ``recovered``); what it could not recover waits for :func:`settle`.

    ``plan``, made while the model was all on meta, before ``load_state_dict(assign=True)`` put the
    checkpoint's tensors in its persistent buffers: a loaded tensor is the materialised tensor of
    every slot that held the meta one (its value is the checkpoint's), what was a view of it is a
    view of it again (in memory laid out as the meta one was, if the loaded tensor is laid out
    otherwise: a checkpoint saved contiguous), and a persistent buffer that was a view of another
    tensor is a view of that one's materialised memory again, holding the loaded value (written after
    that tensor's own, as loading writes it after materialisation)."""
    if plan is None:
        plan = Materialisation(model)
    loaded = {key: _loaded(group) for key, group in plan.groups.items()}
    plan.groups = {key: group for key, group in plan.groups.items()
                   if (group.needs_value or loaded[key]) and (group.tensor is None or group.tensor.is_meta)}
    if not plan.groups:
        return plan
    for key, group in plan.groups.items():
        if group.view is not None and group.view[0][0] == "group" and group.view[0][1] not in plan.groups:
            group.view = None  # its base is left alone: filled on its own
        if loaded[key]:
            group.needs_value = False  # the checkpoint's value, whole
            first, tensor = loaded[key][0]
            if group.viewers and group.tensor is not None and tensor.stride() != group.tensor.stride():
                tensor = _laid_out_as(group.tensor, tensor)  # as its views were planned
                loaded[key][0] = (first, tensor)
            slot = group.buffers[0]
            slot.module._buffers[slot.name] = tensor
        elif group.buffers:  # memory, as to_empty gives it (a view is made a view of its base's again)
            assert group.tensor is not None
            slot = group.buffers[0]
            slot.module._buffers[slot.name] = torch.empty_like(group.tensor, device=device)
    plan.restore(torch.device(device))
    with loading(), torch.no_grad():
        for slot, tensor in (entry for key in plan.groups for entry in loaded[key]):
            current = slot.read()
            if current is not None and current is not tensor and not current.is_meta:
                try:
                    _copy(current, tensor)
                except RuntimeError:  # a view of an expanded tensor that the value is not expanded as (nor
                    slot.write(tensor)  # could loading write it): it keeps the loaded tensor, unshared
    return plan


def _laid_out_as(planned: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in memory laid out as ``planned`` (expanded as it is), or ``value`` itself if it is not
    expanded so."""
    laid = torch.empty_strided(planned.shape, planned.stride(), dtype=value.dtype, device=value.device)
    try:
        _copy(laid, value)
    except RuntimeError:
        return value
    return laid


def _loaded(group: _Group) -> list[tuple[Slot, torch.Tensor]]:
    """The persistent buffers of ``group`` that a load has put a real tensor in since it was planned,
    with that tensor."""
    found = []
    for slot in group.buffers:
        if slot.name not in slot.module._non_persistent_buffers_set:
            tensor = slot.read()
            if tensor is not None and tensor is not group.tensor and not tensor.is_meta:
                found.append((slot, tensor))
    return found
