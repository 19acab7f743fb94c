"""torch.nn.Module: the generic integration every flow goes through.

* ``Module.to_empty``: materialisation; buffers are planned before, restored after.
* ``Module.to``: a move to meta snapshots real non-persistent buffers first.
* ``Module.load_state_dict(assign=True)``: buffers a meta model still has on meta get values.
* ``Module.__new__``: while meta is the default device, record each constructor call.
* ``Module.__deepcopy__``: a deep copy keeps the recipes and snapshots of the original.
* a global parameter-registration hook: during a replay, parameters go to meta.
"""
import copy
import logging
import threading

import torch
import wrapt
from torch import nn

from ..mechanism import recipes, snapshots
from ..mechanism.materialise import materialise_meta_buffers
from ._patching import contained, materialising

logger = logging.getLogger("bufferfix")

_local = threading.local()
_wrappers = {}  # attribute name -> wrapt handle
_active = False
_unrecorded_classes = frozenset()  # see recipes.torch_nn_own_classes
_parameter_hook = []  # handle of the global parameter-registration hook (see recipes.parameters_to_meta)


def _device_of(device):
    return None if device is None else torch.device(device)


def _to_empty(wrapped, instance, args, kwargs):
    if not _active or getattr(_local, "busy", False):
        return wrapped(*args, **kwargs)  # an override calling super().to_empty: the outer call handles it
    device = _device_of(kwargs.get("device"))
    recurse = kwargs.get("recurse", True)
    _local.busy = True
    try:
        if device is not None and device.type == "meta":
            return _moving_to_meta(wrapped, instance, args, kwargs, recurse)
        return materialising(lambda: wrapped(*args, **kwargs), instance, recurse, device)
    finally:
        _local.busy = False


def _to(wrapped, instance, args, kwargs):
    try:
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
    except Exception:  # noqa: BLE001 - let the real call report bad arguments
        device = None
    if not _active or device is None or device.type != "meta":
        return wrapped(*args, **kwargs)
    return _moving_to_meta(wrapped, instance, args, kwargs)


def _load_state_dict(wrapped, instance, args, kwargs):
    """``load_state_dict(assign=True)`` on a meta model (what torch.distributed.checkpoint does when
    it finds meta tensors) materialises parameters by assignment and never touches non-persistent
    buffers: give those their values, on the device the loaded parameters landed on."""
    result = wrapped(*args, **kwargs)
    if _active and kwargs.get("assign", len(args) > 2 and args[2]) and not getattr(_local, "busy", False):
        contained(lambda: _materialise_left_on_meta(instance), "materialising buffers after load_state_dict")
    return result


def _materialise_left_on_meta(model):
    device = next((tensor.device for tensor in model.state_dict().values()
                   if isinstance(tensor, torch.Tensor) and not tensor.is_meta), None)
    if device is not None:
        materialise_meta_buffers(model, device)


def _moving_to_meta(wrapped, instance, args, kwargs, recurse=True):
    move = contained(lambda: snapshots.MoveToMeta(instance, recurse), "snapshotting buffers")
    result = wrapped(*args, **kwargs)
    if move is not None:
        contained(move.after, "snapshotting buffers")
    return result


def _recording_new(cls, *args, **kwargs):
    module = object.__new__(cls)
    if _active and cls not in _unrecorded_classes:
        try:
            if recipes.meta_is_default_device() and not recipes.replaying():
                recipes.record_construction(module, cls, args, kwargs)
        except Exception:  # noqa: BLE001 - never break construction
            logger.exception("bufferfix: could not record the construction of %s", cls.__qualname__)
    return module


def _deepcopy(self, memo):
    """``copy.deepcopy`` exactly as without this hook, then carry recipes/snapshots over."""
    reduced = self.__reduce_ex__(4)
    if isinstance(reduced, str):
        return self
    depth = getattr(_local, "deepcopy_depth", 0)
    _local.deepcopy_depth = depth + 1
    try:
        duplicate = copy._reconstruct(self, memo, *reduced)
    finally:
        _local.deepcopy_depth = depth
    if depth == 0 and (recipes.has_any() or snapshots.has_any()):
        contained(lambda: _carry_over(self, memo), "following a deepcopy")
    return duplicate


def _carry_over(original, memo):
    for module in original.modules():
        duplicate = memo.get(id(module))
        if duplicate is None:
            continue
        recipes.follow_copy(module, duplicate)
        for name, tensor in module._buffers.items():
            copied = memo.get(id(tensor))
            if tensor is not None and copied is not None:
                snapshots.follow_copy(tensor, copied)
                recipes.follow_tensor_copy(tensor, copied)


def _is_ours(candidate, name):
    """Is this one of our hooks, possibly from an earlier import of this module (importlib.reload)?"""
    function = getattr(candidate, "__func__", candidate)
    return getattr(function, "__name__", None) == name and getattr(function, "__module__", None) == __name__


def instrument(_torch=None):
    global _active, _unrecorded_classes
    if _active:
        return
    _unrecorded_classes = recipes.torch_nn_own_classes()
    _wrappers["to_empty"] = wrapt.wrap_function_wrapper(nn.Module, "to_empty", _to_empty)
    _wrappers["to"] = wrapt.wrap_function_wrapper(nn.Module, "to", _to)
    _wrappers["load_state_dict"] = wrapt.wrap_function_wrapper(nn.Module, "load_state_dict", _load_state_dict)
    current_new = nn.Module.__dict__.get("__new__")
    if current_new is None or _is_ours(current_new, "_recording_new"):  # ours, maybe from before a reload
        # CPython cannot take a __new__ back off a class once set (object.__new__ then rejects
        # constructor arguments), so this pass-through stays for the life of the process and
        # does nothing while bufferfix is disabled.
        nn.Module.__new__ = staticmethod(_recording_new)
    else:
        logger.warning("bufferfix: nn.Module.__new__ is already %r; constructors built on meta will not be "
                       "recorded, so their buffers cannot be recomputed", current_new)
    if "__deepcopy__" not in nn.Module.__dict__ or _is_ours(nn.Module.__dict__["__deepcopy__"], "_deepcopy"):
        nn.Module.__deepcopy__ = _deepcopy
    _parameter_hook.append(nn.modules.module.register_module_parameter_registration_hook(recipes.parameters_to_meta))
    _active = True
    logger.debug("bufferfix: torch.nn.Module instrumented")


def uninstrument():
    global _active
    if not _active:
        return
    for name, handle in list(_wrappers.items()):
        try:
            wrapt.unwrap_object(nn.Module, name, handle, missing_ok=True)
        except Exception as error:  # noqa: BLE001 - e.g. a non-wrapt wrapper installed on top of ours
            # Our wrapper stays in the chain but passes straight through while _active is False.
            logger.warning("bufferfix: left an inert wrapper on nn.Module.%s (%s)", name, error)
        del _wrappers[name]
    if _is_ours(nn.Module.__dict__.get("__deepcopy__"), "_deepcopy"):
        del nn.Module.__deepcopy__
    while _parameter_hook:
        _parameter_hook.pop().remove()
    _active = False
    logger.debug("bufferfix: torch.nn.Module uninstrumented")
