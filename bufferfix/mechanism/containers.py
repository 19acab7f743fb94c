"""Tensors a module holds inside a container attribute: a list / tuple / dict of tensors (diffusers'
Lumina2 ``freqs_cis``, PEFT FourierFT's ``indices``) or a plain object holding tensors (the scheduler
of diffusers' ConsistencyDecoderVAE).

``to_empty`` and ``.to()`` never touch them, so in a normal build they stay where the constructor
put them; a model built on meta keeps them on meta, where they fail late or give garbage.  They are
found (only on modules built on meta, so planning stays cheap), recovered like any other value (a
registered recompute function, else a replay of the module's or an ancestor's constructor), and
written back into their container, on the device their constructor put them on (CPU in a replay),
as a normal build has them.  Standard containers only: ``list``, ``tuple``, ``dict`` and objects
with a ``__dict__`` that are neither modules, classes nor callables.
"""
import torch

from .sources import Attempt, Reason  # the Recovery values, as sources imports them

MAX_DEPTH = 3  # attribute -> container -> container / object field -> tensor
_MODULE_INTERNALS = frozenset({
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "_backward_hooks", "_backward_pre_hooks",
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks"})
_SCALARS = (str, bytes, int, float, bool, complex, type(None), type, torch.dtype, torch.device)


class Slot:
    """Where one tensor sits: ``module.<attribute>`` then ``steps`` (``("item", key)`` for a list,
    tuple or dict entry, ``("field", name)`` for an attribute of a plain object)."""

    __slots__ = ("module", "attribute", "steps", "tensor")

    def __init__(self, module, attribute, steps, tensor):
        self.module, self.attribute, self.steps, self.tensor = module, attribute, steps, tensor

    @property
    def name(self):
        """``freqs_cis[0]``, ``scheduler.alphas_cumprod``: the attribute and its steps, as Python reads them."""
        return self.attribute + "".join("[%r]" % key if kind == "item" else "." + key for kind, key in self.steps)


_SKIP, _TENSOR, _SEQUENCE, _MAPPING, _OBJECT = range(1, 6)  # what a value's type asks of the walk (never 0)
_kinds = {}  # type -> one of the five, decided once per type: _kinds.get(type(value)) or _classify(value)


def _classify(value):
    """What the walk does with values of ``value``'s type, decided from the type alone and kept:
    ``isinstance`` on a transformers config calls the config's own ``__getattribute__`` (for
    ``__class__``), and planning looks at every attribute of every module built on meta."""
    cls = type(value)
    if issubclass(cls, torch.Tensor):
        kind = _TENSOR
    elif issubclass(cls, (torch.nn.Module, type) + _SCALARS):
        kind = _SKIP
    elif issubclass(cls, dict):
        kind = _MAPPING
    elif issubclass(cls, (list, tuple)):
        kind = _SEQUENCE
    elif cls.__dictoffset__ and not callable(value) and cls.__module__ != "builtins":
        kind = _OBJECT  # a plain object with attributes (not a function, method, partial, ...)
    else:
        kind = _SKIP
    if len(_kinds) > 10000:  # classes made on the fly: do not keep them all alive
        _kinds.clear()
    _kinds[cls] = kind
    return kind


def _children(value, kind):
    if kind is _MAPPING:
        return [(("item", key), item) for key, item in list(value.items())]
    if kind is _SEQUENCE:
        return [(("item", index), item) for index, item in enumerate(value)]
    return [(("field", key), item) for key, item in list(object.__getattribute__(value, "__dict__").items())]


def slots(module, wanted=lambda tensor: tensor.is_meta, empty=None):
    """Every :class:`Slot` of ``module``'s container attributes holding a tensor ``wanted`` says yes to.

    ``empty``: a dict shared by the calls of one plan, ``id(object) -> depth``: objects found to hold
    no wanted tensor within that depth are not walked again (the config every transformers module
    holds: walked once per plan, not once per module).  The objects stay alive while the plan runs
    (their modules hold them), so an id cannot be reused in between."""
    found, kinds = [], _kinds
    empty = {} if empty is None else empty
    attributes = vars(module)
    for attribute in attributes.keys() - _MODULE_INTERNALS:  # in C: torch's own 17 are never walked
        value = attributes[attribute]
        kind = kinds.get(type(value)) or _classify(value)
        if kind is not _SKIP and kind is not _TENSOR and empty.get(id(value), -1) < MAX_DEPTH:
            _walk(module, attribute, value, kind, (), wanted, found, {id(module)}, MAX_DEPTH, empty)
    if len(found) > 1:  # in the attributes' own order, whatever order the set difference gave
        order = {name: index for index, name in enumerate(attributes)}
        found.sort(key=lambda slot: order[slot.attribute])  # stable: one attribute's slots keep theirs
    return found


def _walk(module, attribute, value, kind, steps, wanted, found, seen, depth, empty):
    if kind is _TENSOR:
        if not isinstance(value, torch.nn.Parameter) and wanted(value):
            found.append(Slot(module, attribute, steps, value))
        return
    if depth == 0 or kind is _SKIP or id(value) in seen or empty.get(id(value), -1) >= depth:
        return
    seen.add(id(value))
    before = len(found)
    for step, item in _children(value, kind):
        kind = _kinds.get(type(item)) or _classify(item)
        _walk(module, attribute, item, kind, steps + (step,), wanted, found, seen, depth - 1, empty)
    if len(found) == before:
        empty[id(value)] = max(depth, empty.get(id(value), -1))


def resolve(module, attribute, steps):
    """The value at ``module.<attribute><steps>``, or None."""
    value = vars(module).get(attribute)
    for kind, key in steps:
        try:
            value = value[key] if kind == "item" else vars(value)[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def write(slot, value):
    """Put ``value`` where ``slot`` says, rebuilding tuples on the way (they cannot be assigned into)."""
    chain = [vars(slot.module)[slot.attribute]]
    for kind, key in slot.steps[:-1]:
        chain.append(chain[-1][key] if kind == "item" else vars(chain[-1])[key])
    new = value
    for holder, (kind, key) in zip(reversed(chain), reversed(slot.steps)):
        if isinstance(holder, tuple):
            items = list(holder)
            items[key] = new
            new = type(holder)(*items) if hasattr(holder, "_fields") else type(holder)(items)
            continue
        if kind == "item":
            holder[key] = new
        else:
            vars(holder)[key] = new
        return
    slot.module.__dict__[slot.attribute] = new


def recover(slot, owners, registered_recompute, replay):
    """``(value, origin, attempts)`` for one slot: ``owners`` are ``(module, relative path)`` from
    the slot's module up; ``registered_recompute(cls)`` and ``replay(module)`` as the buffers use them."""
    attempts = []
    for owner, relative in owners:
        qualified = (relative + "." if relative else "") + slot.name
        function = registered_recompute(type(owner))
        if function is not None:
            try:
                computed = function(owner) or {}
            except Exception as error:  # noqa: BLE001 - user code; report it
                attempts.append(Attempt(_class_name(type(owner)), Reason.RECOMPUTE_RAISED,
                                        "%s: %s" % (type(error).__name__, error)))
                computed = {}
            value = computed.get(qualified)
            if isinstance(value, torch.Tensor) and not value.is_meta:
                return value, _class_name(type(owner)), ()
        replayed = replay(owner, attempts)
        if replayed is None:
            continue
        module, randomised, origin = replayed
        try:
            holder = module.get_submodule(relative) if relative else module
        except AttributeError:
            holder = None
        value = resolve(holder, slot.attribute, slot.steps) if holder is not None else None
        if not isinstance(value, torch.Tensor):
            attempts.append(Attempt(origin, Reason.NOT_CREATED, qualified))
        elif value.is_meta:
            attempts.append(Attempt(origin, Reason.ON_META))
        elif (relative, slot.name) in randomised:
            attempts.append(Attempt(origin, Reason.RANDOM))
        else:
            return value, origin, ()
    return None, None, tuple(dict.fromkeys(attempts)) or (Attempt(None, Reason.NO_RECIPE),)


def _class_name(cls):
    return "%s.%s" % (cls.__module__, cls.__qualname__)
