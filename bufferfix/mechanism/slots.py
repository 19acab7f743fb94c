"""Slots: where one tensor sits in a module, as one value every other part of the mechanism uses.

A :class:`Slot` is one of

* ``BUFFER``: ``module._buffers[name]``;
* ``ATTRIBUTE``: a plain tensor attribute, ``module.__dict__[name]``;
* ``ITEM``: a tensor inside a container attribute, ``module.<name>`` then ``steps`` (``("item", key)``
  for a list, tuple or dict entry, ``("field", name)`` for an attribute of a plain object): diffusers'
  Lumina2 ``freqs_cis``, PEFT FourierFT's ``indices``, a scheduler object's tables;
* ``ABSENT``: a buffer a normal build registers and the meta build did not (torchtune's
  ``rope_init()`` returns early on meta), registered when it gets its value.

Whatever the kind, a slot is read in a live module or at the same place in a replayed one
(:meth:`Slot.read`), and written (:meth:`Slot.write`): the recovery loop (:mod:`.sources`) never
asks which kind it holds.  Views and aliases are not a kind: a slot whose tensor shares storage with
another is planned as a view of it (:mod:`.restore`).

This module also finds the ``ITEM`` slots of a module (:func:`items`).  Standard containers only:
``list``, ``tuple``, ``dict`` and objects with a ``__dict__`` that are neither modules, classes nor
callables.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

BUFFER, ATTRIBUTE, ITEM, ABSENT = "buffer", "attribute", "item", "absent"
Step = tuple[str, Any]  # ("item", key) or ("field", name)

MAX_DEPTH = 3  # attribute -> container -> container / object field -> tensor
MODULE_STATE = frozenset(vars(torch.nn.Module()))  # nn.Module's own attributes, as this torch has them
_SCALARS = (str, bytes, int, float, bool, complex, type(None), type, torch.dtype, torch.device)
_FLAGS = (bool, int, float, str, type(None))


class Slot:
    """Where one tensor sits: ``module``, the ``kind``, the buffer / attribute ``name``, and for an
    ``ITEM`` the ``steps`` inside the container attribute."""

    __slots__ = ("module", "kind", "name", "steps", "persistent")

    def __init__(self, module: torch.nn.Module, kind: str, name: str, steps: tuple[Step, ...] = (),
                 persistent: bool = False) -> None:
        self.module, self.kind, self.name, self.steps = module, kind, name, steps
        self.persistent = persistent  # ABSENT only: how the normal build registers it

    def __repr__(self) -> str:
        return "Slot(%s %s of %s)" % (self.kind, self.label, type(self.module).__qualname__)

    @property
    def label(self) -> str:
        """``inv_freq``, ``freqs_cis[0]``, ``scheduler.alphas_cumprod``: the name as Python reads it."""
        return self.name + "".join("[%r]" % key if kind == "item" else "." + key for kind, key in self.steps)

    def read(self, module: torch.nn.Module | None = None) -> torch.Tensor | None:
        """The tensor at this slot of ``module`` (default: the live one), or None."""
        module = self.module if module is None else module
        if self.kind == ATTRIBUTE:
            value = vars(module).get(self.name)
            if value is None:  # a replay may have it as a buffer where the live module has an attribute
                value = module._buffers.get(self.name)
        elif self.kind == ITEM:
            value = resolve(module, self.name, self.steps)
        else:
            value = module._buffers.get(self.name)
            if value is None and self.name not in module._buffers:
                value = vars(module).get(self.name)
        return value if isinstance(value, torch.Tensor) else None

    def write(self, value: torch.Tensor, replayed: torch.nn.Module | None = None) -> None:
        """Put ``value`` here.  An ``ABSENT`` buffer is registered as the normal build registers it,
        with the plain flags its ``replayed`` module set beside it (torchtune: ``is_cache_built``)."""
        if self.kind == BUFFER:
            self.module._buffers[self.name] = value
        elif self.kind == ATTRIBUTE:
            self.module.__dict__[self.name] = value
        elif self.kind == ITEM:
            _write_item(self.module, self.name, self.steps, value)
        else:
            self.module.register_buffer(self.name, value, persistent=self.persistent)
            if replayed is not None:
                for name, flag in vars(replayed).items():
                    if isinstance(flag, _FLAGS) and not name.startswith("_") and vars(self.module).get(name, flag) != flag:
                        self.module.__dict__[name] = flag


def within(view: torch.Tensor, base: torch.Tensor) -> int | torch.SymInt | None:
    """The offset of ``view``'s first element from ``base``'s, if every element of ``view`` is in
    ``base``'s memory, a contiguous span (``base`` contiguous, or expanded from a contiguous
    tensor), so ``view`` can be made again from a new ``base`` laid out as ``base`` is; else None."""
    offset = view.storage_offset() - base.storage_offset()
    memory = dense(base)
    if not memory.is_contiguous() or offset < 0:
        return None
    last = offset + sum((size - 1) * stride for size, stride in zip(view.shape, view.stride()) if size)
    return offset if view.numel() == 0 or last < memory.numel() else None


def storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage ``tensor`` views, or None for a tensor without one (sparse, nested, a subclass
    without memory): no other tensor can be a view of it, nor it of another."""
    if tensor.layout is not torch.strided:
        return None
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None


def views_again(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """``pairs``: ``(original, copy)`` of tensors copied one by one (``copy.deepcopy`` gives each meta
    tensor storage of its own).  Returns ``{id(copy): view}`` for each copy whose original is a view
    of another original's memory (:func:`within`): the view made again of that one's copy, and
    for that one's copy, if it was laid out afresh (expanded, copied contiguous), a meta tensor laid
    out as its original.  Meta copies only: nothing is copied."""
    bases: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(original storage) -> (original, copy)
    made: dict[int, torch.Tensor] = {}
    for original, copy in sorted(pairs, key=lambda pair: pair[0]._base is not None):
        held = storage(original)
        if held is None:
            continue
        base = bases.setdefault(id(held), (original, copy))
        if base[0] is original or storage(copy) is storage(base[1]):
            continue  # the first of its storage, or copied as a view already
        offset = within(original, base[0])
        if offset is None:
            continue
        if base[1].stride() != base[0].stride():  # copied laid out afresh (an expanded one): as it was, on meta
            relaid = torch.empty_strided(base[0].shape, base[0].stride(), dtype=base[1].dtype, device="meta")
            made[id(base[1])] = relaid
            base = bases[id(storage)] = (base[0], relaid)
        made[id(copy)] = base[1].as_strided(original.shape, original.stride(), base[1].storage_offset() + offset)
    return made


def dense(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` without its expanded dimensions (stride 0, narrowed to one element): its memory,
    each element once.  ``tensor`` itself if it has none."""
    if 0 not in tensor.stride():
        return tensor
    return tensor[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in tensor.stride())]


# --------------------------------------------------------------------------- tensors in containers

_SKIP, _TENSOR, _SEQUENCE, _MAPPING, _OBJECT = range(1, 6)  # what a value's type asks of the walk (never 0)
_kinds: dict[type, int] = {}  # type -> one of the five, decided once per type


def _classify(value: object) -> int:
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


def _children(value: Any, kind: int) -> list[tuple[Step, Any]]:
    if kind == _MAPPING:
        return [(("item", key), item) for key, item in list(value.items())]
    if kind == _SEQUENCE:
        return [(("item", index), item) for index, item in enumerate(value)]
    return [(("field", key), item) for key, item in list(object.__getattribute__(value, "__dict__").items())]


def items(module: torch.nn.Module, wanted: Callable[[torch.Tensor], bool] = lambda tensor: tensor.is_meta,
          empty: dict[int, int] | None = None) -> list[tuple[Slot, torch.Tensor]]:
    """``(ITEM slot, tensor)`` for every tensor in ``module``'s container attributes that ``wanted``
    says yes to, in the attributes' own order.

    ``empty``: a dict shared by the calls of one plan, ``id(object) -> depth``: objects found to hold
    no wanted tensor within that depth are not walked again (the config every transformers module
    holds: walked once per plan, not once per module).  The objects stay alive while the plan runs
    (their modules hold them), so an id cannot be reused in between."""
    found: list[tuple[Slot, torch.Tensor]] = []
    kinds = _kinds
    empty = {} if empty is None else empty
    attributes = vars(module)
    for attribute in attributes.keys() - MODULE_STATE:  # in C: torch's own are never walked
        value = attributes[attribute]
        kind = kinds.get(type(value)) or _classify(value)
        if kind != _SKIP and kind != _TENSOR and empty.get(id(value), -1) < MAX_DEPTH:
            _walk(module, attribute, value, kind, (), wanted, found, {id(module)}, MAX_DEPTH, empty)
    if len(found) > 1:  # in the attributes' own order, whatever order the set difference gave
        order = {name: index for index, name in enumerate(attributes)}
        found.sort(key=lambda pair: order[pair[0].name])  # stable: one attribute's slots keep theirs
    return found


def _walk(module: torch.nn.Module, attribute: str, value: Any, kind: int, steps: tuple[Step, ...],
          wanted: Callable[[torch.Tensor], bool], found: list[tuple[Slot, torch.Tensor]], seen: set[int],
          depth: int, empty: dict[int, int]) -> None:
    if kind == _TENSOR:
        if steps and not isinstance(value, torch.nn.Parameter) and wanted(value):
            found.append((Slot(module, ITEM, attribute, steps), value))
        return
    if depth == 0 or kind == _SKIP or id(value) in seen or empty.get(id(value), -1) >= depth:
        return
    seen.add(id(value))
    before = len(found)
    for step, item in _children(value, kind):
        item_kind = _kinds.get(type(item)) or _classify(item)
        _walk(module, attribute, item, item_kind, steps + (step,), wanted, found, seen, depth - 1, empty)
    if len(found) == before:
        empty[id(value)] = max(depth, empty.get(id(value), -1))


def resolve(module: torch.nn.Module, attribute: str, steps: tuple[Step, ...]) -> Any:
    """The value at ``module.<attribute><steps>``, or None."""
    value: Any = vars(module).get(attribute)
    for kind, key in steps:
        try:
            value = value[key] if kind == "item" else vars(value)[key]
        except (KeyError, IndexError, TypeError):
            return None
    return value


def _write_item(module: torch.nn.Module, attribute: str, steps: tuple[Step, ...], value: torch.Tensor) -> None:
    """Put ``value`` at ``module.<attribute><steps>``, rebuilding tuples on the way (they cannot be
    assigned into)."""
    chain = [vars(module)[attribute]]
    for kind, key in steps[:-1]:
        chain.append(chain[-1][key] if kind == "item" else vars(chain[-1])[key])
    new: Any = value
    for holder, (kind, key) in zip(reversed(chain), reversed(steps)):
        if isinstance(holder, tuple):
            entries = list(holder)
            entries[key] = new
            new = type(holder)(*entries) if hasattr(holder, "_fields") else type(holder)(entries)
            continue
        if kind == "item":
            holder[key] = new
        else:
            vars(holder)[key] = new
        return
    module.__dict__[attribute] = new
