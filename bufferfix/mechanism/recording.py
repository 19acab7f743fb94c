"""Recording: which modules were built on meta, how, and where they sit in their model.

Every module constructed while meta is the default device (thousands for a 70B model) is
recorded from ``nn.Module.__new__``, so recording must cost next to nothing: the raw call
is kept, and turned into an interned :class:`~bufferfix.mechanism.recipes.Recipe` only if
one of its buffers ever needs recomputing.  Records live in a side table keyed by
``id(module)`` with a weak reference, never on the module, so pickling / ``torch.save`` /
``state_dict`` see nothing.

This module also owns the records' lifetimes: a record goes once its module is
materialised, and for modules materialised one at a time (FSDP1's ``param_init_fn``) a
parent keeps its record until every descendant still on meta has been materialised,
since a buffer its constructor put on a child can only come from replaying the parent.
"""
import weakref

import torch
from torch import nn

from . import compat, recipes

_recorded = {}  # id(module) -> (weakref to the module, Recipe or raw construction tuple)
_PRUNE_AT_LEAST = 4096
_prune_at = _PRUNE_AT_LEAST
_parent_index = None  # id(child) -> (weakref to parent, attribute), built when first asked for
_awaiting = {}  # id(module) -> [weakref to the module, descendants still on meta]


# --------------------------------------------------------------------------- is meta the default device?

def meta_is_default_device():
    """Is ``meta`` the default device (``with torch.device("meta")``, set_default_device)?

    Asked for every module constructed, so the answer is kept for as long as the torch-function
    mode stack keeps its length and its top mode (one ``with torch.device("meta")`` block: one
    walk of the stack).  The top is held, so its identity cannot be reused by another mode."""
    global _last_mode_stack
    length = compat.function_mode_stack_length()
    top = compat.function_mode_at(length - 1) if length else None
    last = _last_mode_stack
    if top is last[1] and length == last[0] and top is not None:
        return last[2]
    context = compat.device_context()
    meta = context is not None and _is_meta(context)
    _last_mode_stack = (length, top, meta)
    return meta


def _is_meta(context):
    global _last_device_context
    if context is not _last_device_context[0]:  # device.type builds a string: ask once per context
        _last_device_context = (context, torch.device(context.device).type == "meta")
    return _last_device_context[1]


_last_mode_stack = (0, None, False)  # (stack length, top mode, is meta the default device?)
_last_device_context = (None, False)


def should_record(kwargs):
    """Is a module being constructed now born (partly) on meta, so that its constructor call must
    be kept?  Asked for every module constructed, so the cheapest checks come first:

    * meta is the default device (``with torch.device("meta")``, ``set_default_device``);
    * ``nn.Module.register_parameter`` is patched to put parameters on meta (accelerate's
      ``init_empty_weights()`` / ``init_on_device("meta")`` and transformers' copy of them):
      buffers stay real there, but one computed from a parameter or on a parameter's device
      (timm's Swin ``attn_mask``) is born on meta;
    * a ``device="meta"`` argument (timm's ``create_model(..., device="meta")`` passes it down to
      every module).
    """
    return (meta_is_default_device() or parameters_put_on_meta()
            or (bool(kwargs) and is_meta_device(kwargs.get("device"))))


_ORIGINAL_REGISTER_PARAMETER = nn.Module.register_parameter
_last_register_parameter = (_ORIGINAL_REGISTER_PARAMETER, False)


def parameters_put_on_meta():
    """Has ``nn.Module.register_parameter`` been replaced by a function that puts parameters on
    meta?  accelerate's replacement holds the target device in its closure; the function is
    looked at once, then only compared by identity."""
    global _last_register_parameter
    current = nn.Module.__dict__.get("register_parameter")
    if current is _last_register_parameter[0]:
        return _last_register_parameter[1]
    on_meta = False
    for cell in getattr(current, "__closure__", None) or ():
        try:
            on_meta = on_meta or is_meta_device(cell.cell_contents)
        except ValueError:  # an empty cell
            pass
    _last_register_parameter = (current, on_meta)
    return on_meta


def is_meta_device(value):
    """``"meta"`` or ``torch.device("meta")``, as a ``device=`` argument is given."""
    kind = type(value)
    if kind is str:
        return value == "meta"
    return kind is torch.device and value.type == "meta"


def torch_nn_own_classes():
    """torch.nn's own module classes (Linear, Embedding, LayerNorm, SiLU, ...), containers aside.

    None of their constructors makes a non-persistent buffer or a plain tensor attribute
    (tests/test_hygiene.py reads their sources to check), so their constructions are not
    recorded: they are most of the modules of a model, and a buffer that a parent module puts
    on one of them is recovered by replaying the parent.  Sequential / ModuleList / ModuleDict
    are still recorded: the parent index walks down from recorded modules, and a container is
    often the top of a model (``nn.Sequential(...)``) or between a model and its layers.
    """
    found, pending = set(), [nn.Module]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return frozenset(cls for cls in found
                     if cls.__module__.startswith("torch.nn.modules.") and not issubclass(cls, containers))


# --------------------------------------------------------------------------- the side table

def record_construction(module, cls, args, kwargs):
    """Called from ``nn.Module.__new__`` while meta is the default device: keep the raw call."""
    global _parent_index
    if kwargs and is_meta_device(kwargs.get("device")):
        # Replays run on CPU: the normal build is the same call without device="meta".
        kwargs = dict(kwargs, device=None)
    states = recipes.argument_states(args, kwargs)
    if type(states) is str:  # refused: keep no arguments, they may hold the model itself alive
        args, kwargs = (), {}
    _recorded[id(module)] = (weakref.ref(module), (cls, args, kwargs, torch.get_default_dtype(), states))
    _parent_index = None  # the module tree changed
    if len(_recorded) > _prune_at:
        _prune()


def _prune():
    """Entries are not removed when their module dies (a weakref callback per module costs more
    than the whole record): sweep the dead ones whenever the table has doubled."""
    global _prune_at
    for key, (module_ref, _) in list(_recorded.items()):
        if module_ref() is None:
            del _recorded[key]
    for key, (module_ref, _) in list(_awaiting.items()):
        if module_ref() is None:
            del _awaiting[key]
    _prune_at = max(_PRUNE_AT_LEAST, 2 * len(_recorded))


def was_recorded(module):
    """Was ``module`` built on meta (and not yet materialised)?  Cheaper than :func:`recipe_of`,
    which makes and interns the Recipe."""
    entry = _recorded.get(id(module))
    return entry is not None and entry[0]() is module


def recipe_of(module):
    """The module's Recipe if it was built on meta (made from the raw record on first use)."""
    entry = _recorded.get(id(module))
    if entry is None or entry[0]() is not module:
        return None
    recipe = entry[1]
    if type(recipe) is tuple:
        recipe = recipes.intern(*recipe)
        _recorded[id(module)] = (entry[0], recipe)
    return recipe


def has_any():
    return bool(_recorded)


def live_records():
    """How many live modules have a record (dead entries are swept first)."""
    _prune()
    return len(_recorded)


def replay_nbytes():
    """Bytes of the tensors in the replays cached on live recipes."""
    seen, total = set(), 0
    for _, entry in list(_recorded.values()):
        for slot in ("_replayed", "_replayed_real"):
            cached = getattr(entry, slot, None)
            if type(cached) is tuple and id(cached[0]) not in seen:
                seen.add(id(cached[0]))
                total += sum(t.untyped_storage().nbytes() for t in cached[0].buffers() if not t.is_meta)
    return total


def follow_copy(original, copy):
    """``copy.deepcopy`` of a meta-built module keeps its recipe."""
    global _parent_index
    entry = _recorded.get(id(original))
    if entry is not None and entry[0]() is original:
        _recorded[id(copy)] = (weakref.ref(copy), entry[1])
        _parent_index = None


# --------------------------------------------------------------------------- the module tree

def owners(module, name):
    """``(module, name)``, then each ancestor with the name relative to it."""
    yield module, name
    seen = {id(module)}
    while True:
        parent = _parent_of(module)
        if parent is None or id(parent[0]) in seen:
            return
        module, name = parent[0], parent[1] + "." + name
        seen.add(id(module))
        yield module, name


def ancestors(module):
    for owner, _ in owners(module, ""):
        if owner is not module:
            yield owner


def _parent_of(module):
    """``(parent, attribute)`` if ``module`` is a child of a module built on meta (or of a container
    in one), else None.

    Asked only when a module's own recipe is not enough or a module is materialised alone, so
    the child -> parent index is built then, over every recorded module, and kept until the next
    module is recorded (FSDP1 materialises a thousand modules one by one: one index for all).
    """
    global _parent_index
    index = _parent_index
    if index is None:
        # Every module reachable from a recorded one: torch.nn's leaf classes are not recorded.
        index, visited = {}, set()
        pending = [entry[0]() for entry in list(_recorded.values())]
        while pending:
            parent = pending.pop()
            if parent is None or id(parent) in visited:
                continue
            visited.add(id(parent))
            parent_ref = weakref.ref(parent)
            for attribute, child in parent._modules.items():
                if child is not None:
                    index[id(child)] = (parent_ref, attribute)
                    pending.append(child)
        _parent_index = index
    entry = index.get(id(module))
    if entry is None:
        return None
    parent = entry[0]()
    # The tree may have changed since (a child replaced, a wrapper inserted): only a live link counts.
    if parent is None or parent._modules.get(entry[1]) is not module:
        return None
    return parent, entry[1]


def recorded_path(module):
    """The dotted path of ``module`` below its outermost ancestor built on meta ('' if none):
    names modules in messages when they are materialised one by one (FSDP1's param_init_fn)."""
    names = []
    for _, relative in owners(module, ""):
        names = relative.rstrip(".").split(".") if relative.rstrip(".") else []
    return ".".join(names)


# --------------------------------------------------------------------------- lifetimes

def forget(module):
    """A materialised module no longer needs its recipe (lets the replay cache go).  The parent
    index keeps its weak link: modules materialised one by one after it still need the chain to
    name themselves."""
    # An entry under a live module's id is its own, or a dead module's whose id was reused: both go.
    _recorded.pop(id(module), None)


def forget_all(modules):
    if _recorded:
        for module in modules:
            _recorded.pop(id(module), None)


def holds_meta_tensors(module):
    return any(tensor is not None and tensor.is_meta
               for tensor in (*module._parameters.values(), *module._buffers.values()))


def forget_when_subtree_done(module, was_meta):
    """``module`` was materialised on its own (``to_empty(recurse=False)``): forget its record once
    no descendant still on meta may need it, and count it off its waiting ancestors."""
    waiting = sum(1 for sub in module.modules() if sub is not module and holds_meta_tensors(sub))
    if waiting:
        _awaiting[id(module)] = [weakref.ref(module), waiting]
    else:
        forget(module)
    if not was_meta or not _awaiting:
        return
    for ancestor in ancestors(module):
        entry = _awaiting.get(id(ancestor))
        if entry is not None and entry[0]() is ancestor:
            entry[1] -= 1
            if entry[1] <= 0:
                del _awaiting[id(ancestor)]
                forget(ancestor)


def awaiting_count():
    return sum(1 for module_ref, _ in _awaiting.values() if module_ref() is not None)
