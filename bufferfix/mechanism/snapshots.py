"""Snapshots: real buffer values kept alive when a model is moved to the meta device.

``model.to("meta")`` (or ``to_empty(device="meta")``) throws the values of
non-persistent buffers away; no checkpoint has them.  Before that happens we keep
a reference to the real tensor, keyed (weakly) by the meta tensor that replaces
it.  The snapshot lives exactly as long as that meta tensor: it is freed when
the model is materialised (where it fits, it becomes the materialised buffer
itself, so what still shares its memory shares the buffer's) or garbage
collected.  Nothing is stored on the
module, so ``state_dict``, pickling and ``torch.save`` are unaffected.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import compat
from .slots import items, within
from .slots import storage as storage_of

# (module, name, is it a buffer?) of a view, (module, name, "parameter" or "buffer") of its base, then the
# view's size, stride and offset from the base's
View = tuple[tuple[torch.nn.Module, str, bool], tuple[torch.nn.Module, str, str], tuple[int, ...], tuple[int, ...],
             int | torch.SymInt]

taken = compat.WeakIdKeyDictionary()  # meta tensor -> the real tensor it replaced (read as data by sources)


class MoveToMeta:
    """Around a move to meta: snapshot real non-persistent buffers before, record them after.

    ``Module._apply`` gives every buffer slot its own new tensor, so a buffer shared by two
    modules, or aliased by a plain attribute (4.x rotary ``original_inv_freq``), would stop
    being shared; the slots are pointed at one moved tensor again, as in the normal build.
    A plain tensor attribute that a module's own ``_apply`` moves to meta too is snapshotted like
    a non-persistent buffer (one that stays real keeps its value, and is not held).

    ``unfilled(tensor)``: the meta tensor a real-looking tensor stands for if its value was never
    written (an interrupted materialisation, see :mod:`.restore`); such a tensor is garbage, so it
    takes that meta tensor's snapshot, if any, never its own bytes.
    """

    def __init__(self, root: torch.nn.Module, recurse: bool = True,
                 unfilled: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> None:
        self.unfilled = unfilled
        modules = list(root.modules()) if recurse else [root]
        # id(real tensor) -> [real tensor, [buffer slots], [attribute slots], kept?]: a list of values of
        # several kinds, updated in place (Any).  Kept: snapshotted, so that it is the buffer again after
        # materialisation (non-persistent buffers, and persistent ones whose memory an attribute holds)
        self.groups: dict[int, list[Any]] = {}
        for module in modules:
            for name, tensor in module._buffers.items():
                if tensor is not None and not tensor.is_meta:
                    group = self.groups.setdefault(id(tensor), [tensor, [], [], False])
                    group[1].append((module, name))
                    group[3] = group[3] or name in module._non_persistent_buffers_set
        for module in modules:
            for attribute, value in vars(module).items():
                if isinstance(value, torch.Tensor) and not value.is_meta and not isinstance(value, torch.nn.Parameter):
                    self.groups.setdefault(id(value), [value, [], [], True])[2].append((module, attribute))
        # A persistent buffer whose memory a plain or container attribute holds (the buffer, a view of
        # it, the tensor it is a slice of) is kept too: the move leaves the attribute's tensor real, and
        # it must be the buffer's memory again for loading to write what the attribute holds, as in a
        # normal build.  Not an expanded one: loading cannot write it (materialisation lays it out
        # afresh, and loading writes that).
        held = _held_by_containers(modules)
        for tensor, buffers, attributes, _ in self.groups.values():
            memory = storage_of(tensor) if attributes and not buffers else None  # (an alias follows its buffer)
            if memory is not None:
                held[id(memory)] = memory
        for group in self.groups.values():
            memory = storage_of(group[0]) if group[1] and not group[3] and not _expanded(group[0]) else None
            if memory is not None and id(memory) in held:
                group[3] = True
        self.groups = {key: group for key, group in self.groups.items()
                       if group[3] or len(group[1]) > 1 or group[2]}
        self.views = _views(modules)

    def after(self) -> None:
        for real, buffers, attributes, kept in self.groups.values():
            if buffers:
                owner, name = buffers[0]
                moved = owner._buffers.get(name)
            else:  # attributes only: moved by their module's own _apply, if at all
                owner, name = attributes[0]
                moved = vars(owner).get(name)
            if not isinstance(moved, torch.Tensor) or not moved.is_meta:
                continue
            if moved.stride() != real.stride():  # laid out afresh (an expanded tensor): its views need the old layout
                moved = torch.empty_strided(real.shape, real.stride(), dtype=moved.dtype, device=moved.device)
                if buffers:
                    owner._buffers[name] = moved  # the attributes take it below
            if kept:  # other persistent values come back from the checkpoint
                stands_for = self.unfilled(real) if self.unfilled is not None else None
                value = real if stands_for is None else taken.get(stands_for)
                if value is not None:
                    taken[moved] = value
            for module, other in buffers[1:]:
                module._buffers[other] = moved
            for module, attribute in attributes:
                module.__dict__[attribute] = moved
        for (module, name, is_buffer), (base_module, base_name, base_kind), size, stride, offset in self.views:
            base = getattr(base_module, "_" + base_kind + "s").get(base_name)
            if base is None or not base.is_meta:
                continue
            view = base.as_strided(size, stride, base.storage_offset() + offset)
            if is_buffer:
                module._buffers[name] = view
            else:
                module.__dict__[name] = view


def _held_by_containers(modules: list[torch.nn.Module]) -> dict[int, torch.UntypedStorage]:
    """``{id(storage): storage}`` of every real tensor held in the container attributes of ``modules``
    (lists, tuples, dicts, plain objects: :func:`.slots.items`)."""
    held: dict[int, torch.UntypedStorage] = {}
    walked: dict[int, int] = {}
    for module in modules:
        for _, tensor in items(module, wanted=_real, empty=walked):
            memory = storage_of(tensor)
            if memory is not None:
                held[id(memory)] = memory  # held in the value: its id is not reused meanwhile
    return held


def _real(tensor: torch.Tensor) -> bool:
    return not tensor.is_meta


def _expanded(tensor: torch.Tensor) -> bool:
    return any(stride == 0 and size > 1 for size, stride in zip(tensor.shape, tensor.stride()))


def _views(modules: list[torch.nn.Module]) -> list[View]:
    """``[(slot, base slot, size, stride, offset from the base's)]`` for every buffer or plain tensor
    attribute sharing storage with a parameter or an earlier buffer (``table[:1]``, spectral_norm's
    ``weight`` aliasing its parameter): ``Module._apply`` gives each its own moved tensor, and the
    normal build's views must stay views on meta too."""
    bases: dict[int, tuple[tuple[torch.nn.Module, str, str], torch.Tensor, torch.UntypedStorage]] = {}
    found: list[View] = []
    for module in modules:
        for name, param in module._parameters.items():
            storage = storage_of(param) if param is not None and not param.is_meta else None
            if param is not None and storage is not None:  # held in the value: its id is not reused meanwhile
                bases.setdefault(id(storage), ((module, name, "parameter"), param, storage))
    slots: list[tuple[tuple[torch.nn.Module, str, bool], torch.Tensor | None]]
    slots = [((module, name, True), tensor) for module in modules for name, tensor in module._buffers.items()]
    slots += [((module, name, False), value) for module in modules for name, value in vars(module).items()
              if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)]
    seen: set[int] = set()
    for slot, tensor in sorted(slots, key=lambda pair: pair[1] is None or pair[1]._base is not None):
        if tensor is None or tensor.is_meta or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        storage = storage_of(tensor)
        if storage is None:
            continue
        base = bases.get(id(storage))
        if base is None:
            if slot[2]:
                bases[id(storage)] = ((slot[0], slot[1], "buffer"), tensor, storage)
            continue
        location, base_tensor, _ = base
        offset = within(tensor, base_tensor)
        if offset is not None:  # else it shares memory beyond what the base covers: moved on its own
            found.append((slot, location, tuple(tensor.shape), tensor.stride(), offset))
    return found


def remember(meta_tensor: torch.Tensor, real: torch.Tensor) -> None:
    """A library moved ``real`` to meta itself (a tensor-level ``.to("meta")``, not ``Module.to``):
    keep it as that meta tensor's snapshot (an integration that saw the move calls this)."""
    if meta_tensor.is_meta and not real.is_meta:
        taken[meta_tensor] = real


def follow_copy(original: torch.Tensor, copy: torch.Tensor) -> None:
    """``copy.deepcopy`` of a meta tensor keeps its snapshot."""
    snapshot = taken.get(original)
    if snapshot is not None:
        taken[copy] = snapshot


def has_any() -> bool:
    return len(taken) > 0


def count() -> int:
    return len(taken)


def tensors() -> list[torch.Tensor]:
    """The real values held (for memory accounting)."""
    return list(taken.values())


def nbytes() -> int:
    return sum(tensor.untyped_storage().nbytes() for tensor in {id(t): t for t in tensors()}.values())
