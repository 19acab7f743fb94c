"""torch.nn.Module: the generic integration every flow goes through.

* ``Module.to_empty``: materialisation; buffers are planned before, restored after.
* ``Module.to``: a move to meta snapshots real non-persistent buffers first.
* ``Module.load_state_dict(assign=True)``: buffers a meta model still has on meta get values.
* ``Module._apply``: a tensor converted on meta (a dtype cast) keeps what was noted of it.
* ``Module.__new__``: while meta is the default device, record each constructor call (torch.nn's
  own leaf classes keep C's constructor; ``Module.__init_subclass__`` hooks classes made from them).
* ``Module.__deepcopy__``: a deep copy keeps the recipes and snapshots of the original.
* ``DeviceContext.__init__`` (``with torch.device(...)``): counted, see recording.meta_is_default_device.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .base import (
    Integration,
    Restoring,
    Wrap,
    Wrapped,
    WrapperArgs,
    WrapperKwargs,
    await_loading_end,
    contained,
    loading_ended,
    report,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..mechanism.restore import Materialisation

# This module is imported before torch (the registry reads its target): torch and the mechanism are
# imported where they are used, all of it after torch itself.

logger = logging.getLogger("bufferfix")

_local = threading.local()


def _device_of(device: torch.device | str | int | None) -> torch.device | None:
    import torch

    return None if device is None else torch.device(device)


def _to_empty(wrapped: Wrapped, instance: nn.Module, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    if not INTEGRATION.active or getattr(_local, "busy", False):
        return wrapped(*args, **kwargs)  # an override calling super().to_empty: the outer call handles it
    device = _device_of(kwargs.get("device"))
    recurse = kwargs.get("recurse", True)
    _local.busy = True
    try:
        if device is not None and device.type == "meta":
            return _moving_to_meta(wrapped, instance, args, kwargs, recurse)
        with Restoring(instance, recurse, device):
            return wrapped(*args, **kwargs)
    finally:
        _local.busy = False
        _follow_moved_attributes()


def _to(wrapped: Wrapped, instance: nn.Module, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    from ..mechanism import compat

    try:
        device = compat.parse_to(*args, **kwargs)[0]
    except Exception:  # noqa: BLE001 - let the real call report bad arguments
        device = None
    try:
        if not INTEGRATION.active or device is None or device.type != "meta":
            return wrapped(*args, **kwargs)
        return _moving_to_meta(wrapped, instance, args, kwargs)
    finally:
        _follow_moved_attributes()


def _follow_moved_attributes() -> None:
    """After a move: what a module's own ``_apply`` converted after ``Module._apply`` returned is tied
    to what it was (see _apply), and nothing is held for it any longer."""
    from ..mechanism import recording

    if INTEGRATION.active:
        contained(recording.follow_moved_attributes, "following a move")


def _load_state_dict(wrapped: Wrapped, instance: nn.Module, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    """The end of a ``load_state_dict`` is the end of loading: the verdicts held since
    materialisation are given (see base.await_loading_end), also when the load raised.

    ``load_state_dict(assign=True)`` on a meta model (what torch.distributed.checkpoint does when it
    finds meta tensors) materialises parameters by assignment and never touches non-persistent
    buffers: those get their values first, on the device the loaded parameters landed on.  Also
    when the load raised part of the way through: what it assigned keeps its place."""
    if not INTEGRATION.active or getattr(_local, "busy", False):
        return wrapped(*args, **kwargs)
    from ..mechanism import restore

    assign = kwargs.get("assign", len(args) > 2 and args[2])
    # Planned before the load, while what shares memory with a persistent buffer shares it on meta.
    plan = contained(lambda: restore.Materialisation(instance), "planning buffers before load_state_dict") \
        if assign else None
    try:
        with restore.loading():
            result = wrapped(*args, **kwargs)
    except BaseException:
        if assign:
            contained(lambda: _materialise_left_on_meta(instance, plan), "materialising buffers after load_state_dict",
                      user_error=True)
        contained(loading_ended, "giving the verdicts after load_state_dict", user_error=True)
        raise
    if assign:
        contained(lambda: _materialise_left_on_meta(instance, plan), "materialising buffers after load_state_dict")
    contained(loading_ended, "giving the verdicts after load_state_dict")
    return result


def _materialise_left_on_meta(model: nn.Module, plan: Materialisation | None) -> None:
    """The device the loaded tensors landed on, else that of any real tensor of the model, else
    the CPU (a module holding only non-persistent buffers loads an empty state dict)."""
    import torch

    from ..mechanism.restore import materialise_meta_buffers

    tensors = [tensor for tensor in model.state_dict().values() if isinstance(tensor, torch.Tensor)]
    device = next((tensor.device for tensor in tensors if not tensor.is_meta), None)
    if device is None:
        device = next((t.device for t in (*model.parameters(), *model.buffers()) if not t.is_meta),
                      torch.device("cpu"))
    report(materialise_meta_buffers(model, device, plan), ())
    await_loading_end()


def _moving_to_meta(wrapped: Wrapped, instance: nn.Module, args: WrapperArgs, kwargs: WrapperKwargs,
                    recurse: bool = True) -> Any:
    """Snapshot real non-persistent buffers before a move to meta; record them after it, also
    when the move raised part of the way through (what it moved keeps its snapshot)."""
    from ..mechanism import restore, snapshots

    move = contained(lambda: snapshots.MoveToMeta(instance, recurse, unfilled=restore.left_unfilled),
                     "snapshotting buffers")
    try:
        return wrapped(*args, **kwargs)
    finally:
        if move is not None:
            contained(move.after, "snapshotting buffers", user_error=True)


def _apply(wrapped: Wrapped, instance: nn.Module, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    """``Module._apply`` (``.to(dtype)``, ``.half()``, ``to_empty``, ...): a meta tensor it converts into
    another meta tensor (a dtype cast on meta) keeps what was noted of it (recording.follow_tensor).
    The function is wrapped once, at the outermost call, and handed down to every submodule; the
    attributes that a module's own ``_apply`` converts after this call returns are tied later
    (recording.moving_attributes)."""
    from torch import nn

    from ..mechanism import recording

    if not INTEGRATION.active or getattr(_local, "applying", False):
        return wrapped(*args, **kwargs)
    _follow_moved_attributes()  # what a module's own _apply converted after the last one returned
    own_apply = _owner_of_apply(type(instance)) is not nn.Module
    contained(lambda: recording.moving_attributes(instance, own_apply), "following a move")
    if args:
        args = (_following(args[0]), *args[1:])
    elif "fn" in kwargs:
        kwargs = dict(kwargs, fn=_following(kwargs["fn"]))
    _local.applying = True
    try:
        return wrapped(*args, **kwargs)
    finally:
        _local.applying = False


def _following(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``_apply``'s function, made to tie what it converts on meta to what it was."""
    import torch

    from ..mechanism import recording

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        converted = fn(tensor)
        if converted is not tensor and tensor.is_meta and isinstance(converted, torch.Tensor) and converted.is_meta:
            contained(lambda: recording.follow_tensor(tensor, converted), "following a move on meta")
        return converted

    return convert


def _owner_of_apply(cls: type) -> type:
    """The class whose ``_apply`` ``cls`` uses."""
    return next(owner for owner in cls.__mro__ if "_apply" in owner.__dict__)


def _device_context_made(wrapped: Wrapped, instance: object, args: WrapperArgs, kwargs: WrapperKwargs) -> Any:
    from ..mechanism import recording

    recording.device_context_made()
    return wrapped(*args, **kwargs)


def _deepcopy(self: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """``copy.deepcopy`` exactly as without this hook, then carry recipes/snapshots over."""
    from ..mechanism import compat, recording, snapshots

    reduced = self.__reduce_ex__(4)
    if isinstance(reduced, str):
        return self
    depth = getattr(_local, "deepcopy_depth", 0)
    _local.deepcopy_depth = depth + 1
    try:
        duplicate = compat.reconstruct(self, memo, *reduced)
    finally:
        _local.deepcopy_depth = depth
    if depth == 0 and (recording.has_any() or snapshots.has_any()):
        contained(lambda: _carry_over(self, memo), "following a deepcopy")
    return duplicate


def _carry_over(original: nn.Module, memo: dict[int, Any]) -> None:
    import torch

    from ..mechanism import recording, slots

    # A view among the copied tensors is a view again (meta tensors are copied each to storage of its own).
    copies = []  # (slot in the copy, tensor, its copy)
    for module in original.modules():
        duplicate = memo.get(id(module))
        if duplicate is None:
            continue
        held = [(slots.Slot(duplicate, slots.BUFFER, name), tensor) for name, tensor in module._buffers.items()]
        held += [(slots.Slot(duplicate, slots.ATTRIBUTE, name), tensor) for name, tensor in vars(module).items()
                 if isinstance(tensor, torch.Tensor) and not isinstance(tensor, torch.nn.Parameter)]
        held += [(slots.Slot(duplicate, slot.kind, slot.name, slot.steps), tensor) for slot, tensor in slots.items(module)]
        copies += [(slot, tensor, slot.read()) for slot, tensor in held if tensor is not None and tensor.is_meta]
    pairs = [(tensor, copied) for _, tensor, copied in copies if copied is not None]
    views = slots.views_again(pairs) if len(pairs) > 1 else {}
    for slot, _, copied in copies:
        view = views.get(id(copied))
        if view is not None:
            slot.write(view)
    for module in original.modules():
        duplicate = memo.get(id(module))
        if duplicate is None:
            continue
        recording.follow_copy(module, duplicate, memo)
        for tensor in module._buffers.values():
            copied = memo.get(id(tensor))
            copied = views.get(id(copied), copied)
            if tensor is not None and copied is not None:
                recording.follow_tensor(tensor, copied)


def _init_subclass(cls: type[nn.Module], **kwargs: Any) -> None:
    """``nn.Module.__init_subclass__``: a class made from one of torch.nn's leaf classes
    (``class MyNorm(nn.LayerNorm)``) would inherit their C constructor: it gets the recording
    ``__new__`` (see recording.keep_c_constructor)."""
    from torch import nn

    from ..mechanism import recording

    super(nn.Module, cls).__init_subclass__(**kwargs)
    hook = nn.Module.__dict__.get("__new__")
    if hook is not None and recording.inherits_c_constructor(cls):
        contained(lambda: setattr(cls, "__new__", hook), "hooking the constructor of %s" % cls.__qualname__)


def _is_ours(candidate: object, name: str) -> bool:
    """Is this one of our hooks, possibly from an earlier import of this module (importlib.reload)?"""
    function = getattr(candidate, "__func__", candidate)
    return getattr(function, "__name__", None) == name and getattr(function, "__module__", None) == __name__


class TorchNN(Integration):
    name = "torch_nn"
    target = "torch"
    patches = "torch.nn.Module"

    def __init__(self) -> None:
        super().__init__()
        self.unrecorded_classes: frozenset[type[nn.Module]] = frozenset()  # see recording.torch_nn_own_classes
        self._buffer_hook: torch.utils.hooks.RemovableHandle | None = None  # see recording.buffer_registered
        self._module_hook: torch.utils.hooks.RemovableHandle | None = None  # see recording.module_registered

    declarations = (
        Wrap("torch.nn", "Module.to_empty", _to_empty),
        Wrap("torch.nn", "Module.to", _to),
        Wrap("torch.nn", "Module.load_state_dict", _load_state_dict),
        Wrap("torch.nn", "Module._apply", _apply),
    )

    def _instrument(self, module: ModuleType) -> None:
        from torch import nn

        from ..mechanism import compat, recording

        current_new = nn.Module.__dict__.get("__new__")
        if current_new is None or recording.is_constructor_hook(current_new):
            # None, or ours (maybe from before an importlib.reload).  CPython cannot take a __new__
            # back off a class once set (object.__new__ then rejects constructor arguments), so
            # this pass-through stays for the life of the process, doing nothing while disabled.
            self.unrecorded_classes = recording.torch_nn_own_classes()
            if current_new is None:  # while their C slot is still object.__new__'s: see keep_c_constructor
                recording.keep_c_constructor(self.unrecorded_classes)
            hook = staticmethod(recording.constructor_hook(self, self.unrecorded_classes))
            nn.Module.__new__ = hook  # type: ignore[method-assign, assignment]  # patching torch's class is the point
            recording.hook_subclasses_of(self.unrecorded_classes, hook)
            nn.Module.__init_subclass__ = classmethod(_init_subclass)  # type: ignore[method-assign, assignment]  # as __new__
        else:
            logger.warning("bufferfix: nn.Module.__new__ is already %r; constructors built on meta will not be "
                           "recorded, so their buffers cannot be recomputed", current_new)
        if "__deepcopy__" not in nn.Module.__dict__ or _is_ours(nn.Module.__dict__["__deepcopy__"], "_deepcopy"):
            nn.Module.__deepcopy__ = _deepcopy  # type: ignore[attr-defined]  # torch's Module has none of its own
        # Each `with torch.device(...)` makes a DeviceContext (called from C++): what recording kept
        # about the default device may be stale then, and after any time spent switched off.
        self.wrap(compat.DeviceContext, "__init__", _device_context_made)
        recording.device_context_made()
        self._buffer_hook = nn.modules.module.register_module_buffer_registration_hook(
            recording.buffer_registered)
        self._module_hook = nn.modules.module.register_module_module_registration_hook(
            recording.module_registered)

    def _uninstrument(self) -> None:
        from torch import nn

        from ..mechanism import recording

        if self._buffer_hook is not None:
            self._buffer_hook.remove()
            self._buffer_hook = None
        if self._module_hook is not None:
            self._module_hook.remove()
            self._module_hook = None
        hook: Any = nn.Module.__dict__.get("__new__")  # ours (a staticmethod), or whatever another library put
        if recording.is_constructor_hook(hook):
            hook.__func__.hooked_classes.clear()  # its fast path: a class in there is recorded at once
        if _is_ours(nn.Module.__dict__.get("__init_subclass__"), "_init_subclass"):
            del nn.Module.__init_subclass__  # classes made while off are hooked at the next enable
        if _is_ours(nn.Module.__dict__.get("__deepcopy__"), "_deepcopy"):
            del nn.Module.__deepcopy__  # type: ignore[attr-defined]  # ours, set in _instrument


INTEGRATION = TorchNN()
