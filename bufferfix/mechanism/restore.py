"""Restore: put the right values into non-persistent buffers around a materialisation.

A :class:`Materialisation` is built *before* tensors are swapped for empty memory
(``to_empty``, or a library's own equivalent) and :meth:`Materialisation.restore`
runs *after*.  Before, it notes every non-persistent buffer, every plain tensor
attribute that aliases a buffer (4.x rotary ``original_inv_freq``) or sits on meta,
and which slots share one tensor.  After, it

* re-shares tensors that were shared (``empty_like`` gave each slot its own),
* fills each non-persistent buffer from the first source that has its value
  (:mod:`.sources`),
* returns whatever it could not recover, as :class:`~bufferfix.recovery.Recovery` values (the
  integration that called it reports them: the mechanism makes no words).

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
import logging
import weakref

import torch

from ..recovery import Attempt, Reason, Recovery
from . import compat, deferral, extras, recipes, recording, snapshots, sources

logger = logging.getLogger("bufferfix")

# A tensor shared by several modules that are materialised one call at a time (FSDP1's
# param_init_fn calls to_empty(recurse=False) per module) must end up shared again: the
# first call's result is remembered, keyed weakly by the tensor it replaced, and held weakly too:
# an unfilled mark holds that replaced tensor, so a strong value here would keep both alive for ever.
_materialised = compat.WeakIdKeyDictionary()
# Materialised tensor whose value was not written yet -> (the tensor it replaced, its version then).
_unfilled = compat.WeakIdKeyDictionary()


class _Group:
    """One tensor and every slot (buffer or attribute) that held it before materialisation."""

    __slots__ = ("tensor", "old", "buffers", "attributes", "needs_value")

    def __init__(self, tensor):
        self.tensor = tensor  # what the slots held before materialisation
        self.old = tensor  # where the value comes from: ``tensor``, or the meta tensor it stands in for
        self.buffers = []  # (module, name)
        self.attributes = []  # (module, name)
        self.needs_value = False


def _qualified(path, name):
    return "%s.%s" % (path, name) if path else name


# Types seen as module attributes that are not tensors (bool, dict, set, configs, ...): a module
# whose attributes all have such types holds no tensor attribute, which set.issuperset decides in C.
_NON_TENSOR_TYPES = set()


def _modules_in_order(root):
    """``root.modules()`` (pre-order, each module once), without nested generators."""
    found, pending = {}, [root]
    while pending:
        module = pending.pop()
        if module is not None and id(module) not in found:
            found[id(module)] = module
            pending.extend(reversed(module._modules.values()))
    return list(found.values())


def _remember_non_tensor_type(kind):
    if len(_NON_TENSOR_TYPES) > 10000:  # e.g. classes made on the fly: do not keep them all alive
        _NON_TENSOR_TYPES.clear()
    _NON_TENSOR_TYPES.add(kind)


def left_unfilled(tensor):
    """The meta tensor ``tensor`` replaced, if its value was never written; else None."""
    mark = _unfilled.get(tensor)
    if mark is None:
        return None
    if recipes.raw_version(tensor) != mark[1]:  # written in place since: its value stands
        del _unfilled[tensor]
        return None
    return mark[0]


class Materialisation:
    def __init__(self, root, recurse=True):
        # Runs over every module of the model at every materialisation: module paths (only needed
        # to name a buffer in a message) are worked out later, and only if asked for.
        self.root, self.recurse = root, recurse
        self.modules = _modules_in_order(root) if recurse else [root]
        self.root_was_meta = recording.holds_meta_tensors(root) if not recurse else True
        self._paths = None
        self.extras = extras.Extras()  # containers, buffers registered off meta, weight norm
        self.recovered = []  # Recovery of each value filled, kept only while debug logging is on
        self.groups = {}
        for module in self.modules:
            if not module._buffers:
                continue
            non_persistent = module._non_persistent_buffers_set
            for name, tensor in module._buffers.items():
                if tensor is not None:
                    group = self._group(tensor)
                    group.buffers.append((module, name))
                    if name in non_persistent:
                        group.needs_value = True
        if _unfilled:
            for group in self.groups.values():
                stands_for = left_unfilled(group.tensor)
                if stands_for is not None:
                    group.old, group.needs_value = stands_for, True
        for module in self.modules:
            attributes = vars(module)
            if _NON_TENSOR_TYPES.issuperset(map(type, attributes.values())):
                continue  # the common case, decided in C
            for name, value in attributes.items():
                if not isinstance(value, torch.Tensor):
                    _remember_non_tensor_type(type(value))
                elif not isinstance(value, torch.nn.Parameter):
                    group = self.groups.get(id(value))
                    if group is None and value.is_meta and self.extras.derived(module, name):
                        continue  # recomputed from parameters by a weight-norm hook: not a lost value
                    if group is None and value.is_meta:  # a plain attribute that never got a value
                        group = self._group(value)
                        group.needs_value = True
                    if group is not None:
                        group.attributes.append((module, name))
        self.groups = {key: group for key, group in self.groups.items()
                       if group.needs_value or group.attributes or len(group.buffers) > 1}
        self.extras.plan(self.modules)

    def _path(self, module):
        if self._paths is None:
            if self.recurse:
                self._paths = {id(sub): path for path, sub in self.root.named_modules()}
            else:  # one module of a model materialised module by module: name it by where it was built
                self._paths = {id(self.root): recording.recorded_path(self.root)}
        return self._paths.get(id(module), "")

    def _group(self, tensor):
        group = self.groups.get(id(tensor))
        if group is None:
            group = self.groups[id(tensor)] = _Group(tensor)
        return group

    # ------------------------------------------------------------------ after
    def restore(self, device=None, defer_replays=False):
        """Fill every buffer that needs a value.  With ``defer_replays``, values that only a
        replay can give are held back in a :class:`~.deferral.DeferredRestore`.  Returns
        ``(DeferredRestore or None, [Recovery of each value not recovered])``."""
        failures, held_back = [], []
        with torch.no_grad():
            self.extras.restore(self, device, failures)
            for group, target in self._materialised_groups():
                if defer_replays and self._only_a_replay_can_fill(group, target):
                    held_back.append((group, target))
                    continue
                self.fill(group, target, failures, device)
        if held_back:
            return deferral.DeferredRestore(self, held_back, failures), []
        return None, self.finish(failures)

    def restore_after_error(self, device=None):
        """The materialising call raised part of the way through: fill every slot it had already
        swapped for empty memory (the rest still holds meta tensors, which fail loudly when used
        and are filled by the next materialisation).  Records are kept for that retry.  Returns
        the Recovery of each value not recovered."""
        failures = []
        with torch.no_grad():
            for group, target in self._materialised_groups(changed_only=True):
                self.fill(group, target, failures, device)
        return failures

    def _materialised_groups(self, changed_only=False):
        """``[(group, target)]`` for every group that needs a value, after re-sharing.  Every real
        target is marked unfilled, all of them before any is filled, until :meth:`fill` writes it."""
        pending = []
        for group in self.groups.values():
            if changed_only and not self._changed(group):
                continue
            target = self._reshare(group)
            if group.needs_value:
                pending.append((group, target))
        for group, target in pending:
            if target is not None and not target.is_meta:
                _unfilled[target] = (group.old, recipes.raw_version(target))
        return pending

    @staticmethod
    def _changed(group):
        slots = [module._buffers.get(name) for module, name in group.buffers]
        slots += [vars(module).get(name) for module, name in group.attributes]
        return any(slot is not group.tensor for slot in slots)

    @staticmethod
    def _only_a_replay_can_fill(group, target):
        return (target is not None and not target.is_meta and group.old.is_meta
                and snapshots.recall(group.old) is None)

    def fill(self, group, target, failures, device=None):
        """Give ``group`` its value in ``target``; what cannot be recovered goes into ``failures``."""
        found = sources.find(group.old, group.buffers + group.attributes)
        if found.value is None:
            failures.append(self._recovery(group, found))
            return
        if logger.isEnabledFor(logging.DEBUG):
            self.recovered.append(self._recovery(group, found))
        if target is None:  # a plain attribute only: it takes the recovered tensor itself
            moved = found.value.to(device if device is not None else found.value.device, copy=True)
            for module, name in group.attributes:
                module.__dict__[name] = moved
            return
        if tuple(found.value.shape) != tuple(target.shape):
            failures.append(self._recovery(group, sources.Found(None, attempts=(Attempt(
                found.origin, Reason.SHAPE_MISMATCH, "%s vs %s" % (tuple(found.value.shape), tuple(target.shape))),))))
            return
        self._write(group, target, found.value)

    def finish(self, failures):
        """The materialisation is complete: records go; returns ``failures``.  After a failure the
        records stay (until the model dies), so a retry can still replay."""
        if failures:
            pass
        elif self.recurse:
            recording.forget_all(self.modules)
        else:
            recording.forget_when_subtree_done(self.root, self.root_was_meta)
        return failures

    def _reshare(self, group):
        """Make every slot of the group hold the same (materialised) tensor again."""
        if not group.buffers:
            return None
        module, name = group.buffers[0]
        target = module._buffers[name]
        earlier = _materialised.get(group.tensor)
        earlier = earlier() if earlier is not None else None
        if earlier is not None and earlier.device == target.device and earlier.dtype == target.dtype:
            target = module._buffers[name] = earlier
            if earlier not in _unfilled:
                group.needs_value = False  # filled by the earlier call
        elif not target.is_meta and target is not group.tensor:
            _materialised[group.tensor] = weakref.ref(target)
        for other, other_name in group.buffers[1:]:
            other._buffers[other_name] = target
        for other, other_name in group.attributes:
            other.__dict__[other_name] = target
        return target

    @staticmethod
    def _write(group, target, value):
        if target.is_meta:
            return  # still on meta (e.g. to_empty(device="meta")): nothing to fill
        try:
            target.copy_(value)
            _unfilled.pop(target, None)
        except RuntimeError:
            # An expanded target (stride 0) cannot be written element-wise: swap the tensor.
            _unfilled.pop(target, None)
            replacement = value.to(device=target.device, dtype=target.dtype, copy=True)
            for module, name in group.buffers:
                module._buffers[name] = replacement
            for module, name in group.attributes:
                module.__dict__[name] = replacement

    @staticmethod
    def left_to_the_library(target):
        """The library's own initialisation overwrites ``target`` whole: its value stands."""
        _unfilled.pop(target, None)

    def _recovery(self, group, found):
        module, name = (group.buffers or group.attributes)[0]
        attempts = found.attempts
        return Recovery(
            name=_qualified(self._path(module), name), owner=type(module).__qualname__,
            kind="buffer" if group.buffers else "attribute", source=found.source, origin=found.origin,
            reason=attempts[0].reason if found.source is None and attempts else None,
            detail=attempts[0].detail if found.source is None and attempts else "", attempts=attempts)

    def explain(self):
        """A :class:`~bufferfix.recovery.Recovery` for every tensor that needs a value; changes nothing."""
        return [self._recovery(group, sources.find(group.old, group.buffers + group.attributes))
                for group in self.groups.values() if group.needs_value]


def unfilled_count():
    return len(_unfilled)


def materialise_meta_buffers(model, device="cpu"):
    """Give every non-persistent buffer (and plain tensor attribute) still on meta its value on
    ``device``, leaving everything else alone.  For libraries that load parameters themselves
    and never materialise what is not in the checkpoint (accelerate's dispatch and loading).
    Returns the plan (its ``recovered``) and the Recovery of each value not recovered."""
    plan = Materialisation(model)
    plan.groups = {key: group for key, group in plan.groups.items() if group.needs_value and group.tensor.is_meta}
    if not plan.groups and not plan.extras:
        return plan, []
    for group in plan.groups.values():
        if group.buffers:
            module, name = group.buffers[0]
            module._buffers[name] = torch.empty_like(group.tensor, device=device)
    return plan, plan.restore(device)[1]

