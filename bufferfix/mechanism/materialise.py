"""Restore: put the right values into non-persistent buffers around a materialisation.

A :class:`Materialisation` is built *before* tensors are swapped for empty memory
(``to_empty``, or a library's own equivalent) and :meth:`Materialisation.restore`
runs *after*.  Before, it notes every non-persistent buffer, every plain tensor
attribute that aliases a buffer (4.x rotary ``original_inv_freq``) or sits on
meta, and which slots share one tensor.  After, it

* re-shares tensors that were shared (``empty_like`` gave each slot its own),
* fills each non-persistent buffer from, in order: its old real value
  (``init_empty_weights()`` keeps buffers real), a snapshot taken when the model
  went to meta, a registered recompute function, a replay of the constructor of
  the module or of its nearest ancestor that reproduces it,
* reports whatever it could not recover.

Values are copied into the materialised tensor, so it keeps the dtype and device
the materialisation gave it (exactly what ``.to()`` would do to a normal build).

When a library's own initialisation runs right after the materialisation
(transformers' ``_init_weights``), values that need a replay can be held back
until it has run (:class:`DeferredRestore`), so buffers it recomputes anyway cost
no replay.
"""
import logging
import weakref

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .. import errors
from . import recipes, snapshots

logger = logging.getLogger("bufferfix")

# A tensor shared by several modules that are materialised one call at a time (FSDP1's
# param_init_fn calls to_empty(recurse=False) per module) must end up shared again: the
# first call's result is remembered, keyed weakly by the tensor it replaced.
_materialised = WeakIdKeyDictionary()


class _Group:
    """One tensor and every slot (buffer or attribute) that held it before materialisation."""

    __slots__ = ("tensor", "buffers", "attributes", "needs_value")

    def __init__(self, tensor):
        self.tensor = tensor
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


class Materialisation:
    def __init__(self, root, recurse=True):
        # Runs over every module of the model at every materialisation: module paths (only needed
        # to name a buffer in a message) are worked out later, and only if asked for.
        self.root, self.recurse = root, recurse
        self.modules = _modules_in_order(root) if recurse else [root]
        if not recurse:
            self.root_was_meta = _holds_meta_tensors(root)
        self._paths = None
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
        for module in self.modules:
            attributes = vars(module)
            if _NON_TENSOR_TYPES.issuperset(map(type, attributes.values())):
                continue  # the common case, decided in C
            for name, value in attributes.items():
                if not isinstance(value, torch.Tensor):
                    _remember_non_tensor_type(type(value))
                elif not isinstance(value, torch.nn.Parameter):
                    group = self.groups.get(id(value))
                    if group is None and value.is_meta:  # a plain attribute that never got a value
                        group = self._group(value)
                        group.needs_value = True
                    if group is not None:
                        group.attributes.append((module, name))
        self.groups = {key: group for key, group in self.groups.items()
                       if group.needs_value or group.attributes or len(group.buffers) > 1}

    def _path(self, module):
        if self._paths is None:
            if self.recurse:
                self._paths = {id(sub): path for path, sub in self.root.named_modules()}
            else:  # one module of a model materialised module by module: name it by where it was built
                self._paths = {id(self.root): recipes.recorded_path(self.root)}
        return self._paths.get(id(module), "")

    def _group(self, tensor):
        group = self.groups.get(id(tensor))
        if group is None:
            group = self.groups[id(tensor)] = _Group(tensor)
        return group

    # ------------------------------------------------------------------ after
    def restore(self, device=None, defer_replays=False):
        """Fill every buffer that needs a value.  With ``defer_replays``, values that only a
        replay can give are held back and a :class:`DeferredRestore` is returned (or None)."""
        failures, deferred = [], []
        with torch.no_grad():
            for group in self.groups.values():
                target = self._reshare(group)
                if not group.needs_value:
                    continue
                if defer_replays and self._only_a_replay_can_fill(group, target):
                    deferred.append((group, target))
                    continue
                self._fill(group, target, device, failures)
        if deferred:
            return DeferredRestore(self, deferred, failures)
        self._finish(failures)
        return None

    @staticmethod
    def _only_a_replay_can_fill(group, target):
        return (target is not None and not target.is_meta and group.tensor.is_meta
                and snapshots.recall(group.tensor) is None)

    def _fill(self, group, target, device, failures):
        value, how = self._value_for(group)
        if value is None:
            failures.append((self._name(group), how))
            return
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("bufferfix: %s: %s", self._name(group), how)
        if target is None:  # a plain attribute only: it takes the recovered tensor itself
            moved = value.to(device if device is not None else value.device, copy=True)
            for module, name in group.attributes:
                module.__dict__[name] = moved
            return
        if tuple(value.shape) != tuple(target.shape):
            failures.append((self._name(group), "recovered value has shape %s but the materialised "
                             "buffer has shape %s" % (tuple(value.shape), tuple(target.shape))))
            return
        self._write(group, target, value)

    def _finish(self, failures):
        if self.recurse:
            recipes.forget_all(self.modules)
        else:
            _forget_when_subtree_done(self.root, self.root_was_meta)
        errors.report_unrecoverable(failures)

    def _reshare(self, group):
        """Make every slot of the group hold the same (materialised) tensor again."""
        if not group.buffers:
            return None
        module, name = group.buffers[0]
        target = module._buffers[name]
        earlier = _materialised.get(group.tensor)
        if earlier is not None and earlier.device == target.device and earlier.dtype == target.dtype:
            target = module._buffers[name] = earlier
            group.needs_value = False  # filled by the earlier call
        elif not target.is_meta:
            _materialised[group.tensor] = target
        for other, other_name in group.buffers[1:]:
            other._buffers[other_name] = target
        for other, other_name in group.attributes:
            other.__dict__[other_name] = target
        return target

    def _write(self, group, target, value):
        if target.is_meta:
            return  # still on meta (e.g. to_empty(device="meta")): nothing to fill
        try:
            target.copy_(value)
        except RuntimeError:
            # An expanded target (stride 0) cannot be written element-wise: swap the tensor.
            replacement = value.to(device=target.device, dtype=target.dtype, copy=True)
            for module, name in group.buffers:
                module._buffers[name] = replacement
            for module, name in group.attributes:
                module.__dict__[name] = replacement

    def _name(self, group):
        module, name = (group.buffers or group.attributes)[0]
        return "%s (%s)" % (_qualified(self._path(module), name), type(module).__qualname__)

    # ------------------------------------------------------------------ sources
    def _value_for(self, group):
        """``(value, how)`` or ``(None, why not)``."""
        old = group.tensor
        if not old.is_meta:
            return old, "real value kept"  # real all along (init_empty_weights keeps buffers real)
        snapshot = snapshots.recall(old)
        if snapshot is not None:
            return snapshot, "snapshot taken before the move to meta"
        reasons = []
        for module, name in group.buffers + group.attributes:
            value, how = self._recompute(module, name, old, reasons)
            if value is not None:
                return value, how
        return None, "; ".join(dict.fromkeys(reasons)) or "no way to recompute it was found"

    def _recompute(self, module, name, live, reasons):
        for owner, relative in recipes.owners(module, name):
            function = recipes.registered_recompute(type(owner))
            if function is not None:  # the author's own recompute function comes first
                value = _call_recompute_function(function, owner, relative, reasons)
                if value is not None:
                    return value, "registered recompute function for %s" % type(owner).__qualname__
            recipe = recipes.recipe_of(owner)
            if recipe is None:
                continue
            try:
                replayed, randomised = recipes.replay(recipe)
            except recipes.ReplayError as error:
                reasons.append("%s: %s" % (recipe.describe(), error))
                continue
            value = _lookup(replayed, relative)
            sub_path, _, leaf = relative.rpartition(".")
            if value is None:
                reasons.append("re-running %s did not create %r" % (recipe.describe(), relative))
            elif value.is_meta:
                reasons.append("re-running %s puts it on meta explicitly" % recipe.describe())
            elif (sub_path, leaf) in randomised:
                reasons.append("re-running %s draws it from the random number generator, so the "
                               "normal build's values are unknowable" % recipe.describe())
            elif _changed_after_construction(live, recipe, relative):
                reasons.append("it was modified in place after %s returned" % recipe.describe())
            else:
                return value, "replay of %s" % recipe.describe()
        if not reasons:
            reasons.append("it was born on meta and no constructor was recorded for it or its parents "
                           "(was the model built while bufferfix was active?)")
        return None, None

    def explain(self):
        """``[(qualified name, tensor, how it would be recovered or None, why not)]``; changes nothing."""
        report = []
        for group in self.groups.values():
            if group.needs_value:
                value, how = self._value_for(group)
                report.append((self._name(group), group.tensor, how if value is not None else None,
                               None if value is not None else how))
        return report


class DeferredRestore:
    """Buffers whose value only a constructor replay can give, held back while a library's own
    initialisation runs (transformers' ``_init_weights`` recomputes the buffers of its own
    models, so replaying them too would be wasted work).

    Inside :meth:`watching`, a buffer the initialisation overwrites whole (``copy_``,
    ``fill_``, ``normal_``, ...) is left to it; a buffer it touches in any other way (reads it,
    writes part of it, takes ``.data``) is filled first, so it never sees uninitialised memory.
    :meth:`finish` fills whatever the initialisation did not overwrite.
    """

    def __init__(self, plan, pending, failures):
        self.plan = plan
        self.pending = {id(target): (group, target) for group, target in pending}
        self.failures = failures

    def watching(self):
        return _FirstUse(self)

    def fill(self, key):
        group, target = self.pending.pop(key)
        with torch.no_grad():
            self.plan._fill(group, target, None, self.failures)

    def left_to_the_library(self, key):
        self.pending.pop(key)

    def finish(self):
        for key, (group, target) in list(self.pending.items()):
            module, name = group.buffers[0]
            if module._buffers.get(name) is not target:
                continue  # the initialisation registered a tensor of its own there: its value stands
            self.fill(key)
        self.pending.clear()
        self.plan._finish(self.failures)


def _overwriting_functions():
    """Functions that overwrite every element of their first argument without reading it."""
    tensor_methods = ("copy_", "fill_", "zero_", "normal_", "uniform_")
    init_functions = ("normal_", "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_")
    return frozenset([getattr(torch.Tensor, name) for name in tensor_methods]
                     + [getattr(torch.nn.init, name) for name in init_functions if hasattr(torch.nn.init, name)])


def _metadata_functions():
    """Functions on a tensor that do not look at its values."""
    properties = ("shape", "dtype", "device", "is_meta", "ndim", "requires_grad", "layout", "is_cuda", "is_leaf",
                  "grad_fn", "names")
    methods = ("size", "dim", "numel", "element_size", "stride", "is_contiguous", "__len__", "nelement",
               "get_device", "is_floating_point", "is_complex")
    return frozenset([getattr(torch.Tensor, name).__get__ for name in properties if hasattr(torch.Tensor, name)]
                     + [getattr(torch.Tensor, name) for name in methods if hasattr(torch.Tensor, name)])


_OVERWRITING = _overwriting_functions()
_METADATA = _metadata_functions()


class _FirstUse(TorchFunctionMode):
    def __init__(self, deferred):
        super().__init__()
        self.deferred = deferred

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pending = self.deferred.pending
        if pending and func not in _METADATA:
            for position, value in enumerate(_arguments(args, kwargs)):
                if id(value) in pending:
                    if position == 0 and func in _OVERWRITING:
                        self.deferred.left_to_the_library(id(value))
                    else:
                        self.deferred.fill(id(value))
        return func(*args, **kwargs)


def _arguments(args, kwargs):
    """Positional arguments first (position 0 is ``self`` for a tensor method), then the rest;
    tensors inside lists and tuples too."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield None  # keeps position 0 meaning "the first argument itself"
            yield from value
        else:
            yield value


# Modules materialised one at a time (FSDP1's param_init_fn), parents first: a parent keeps its
# recipe until every descendant that was still on meta has been materialised, since a buffer
# its constructor put on a child can only come from replaying the parent.
_awaiting = {}  # id(module) -> [weakref to the module, descendants still on meta]


def _holds_meta_tensors(module):
    return any(tensor is not None and tensor.is_meta
               for tensor in (*module._parameters.values(), *module._buffers.values()))


def _forget_when_subtree_done(module, was_meta):
    waiting = sum(1 for sub in module.modules() if sub is not module and _holds_meta_tensors(sub))
    if waiting:
        _awaiting[id(module)] = [weakref.ref(module), waiting]
    else:
        recipes.forget(module)
    if not was_meta or not _awaiting:
        return
    for ancestor in recipes.ancestors(module):
        entry = _awaiting.get(id(ancestor))
        if entry is not None and entry[0]() is ancestor:
            entry[1] -= 1
            if entry[1] <= 0:
                del _awaiting[id(ancestor)]
                recipes.forget(ancestor)


def materialise_meta_buffers(model, device="cpu"):
    """Give every non-persistent buffer (and plain tensor attribute) still on meta its value on
    ``device``, leaving everything else alone.  For libraries that load parameters themselves
    and never materialise what is not in the checkpoint (accelerate's dispatch and loading)."""
    plan = Materialisation(model)
    plan.groups = {key: group for key, group in plan.groups.items() if group.needs_value and group.tensor.is_meta}
    if not plan.groups:
        return
    for group in plan.groups.values():
        if group.buffers:
            module, name = group.buffers[0]
            module._buffers[name] = torch.empty_like(group.tensor, device=device)
    plan.restore(device)


def _call_recompute_function(function, owner, relative, reasons):
    try:
        computed = function(owner)
    except Exception as error:  # noqa: BLE001 - user code; report it
        reasons.append("recompute function for %s raised %s: %s"
                       % (type(owner).__qualname__, type(error).__name__, error))
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
