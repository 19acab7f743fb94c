"""Every torch private API bufferfix uses, in one place, with the torch versions it was run on.

torch moves private APIs between releases.  Each one is resolved here, once, at import: a
torch where one of them is missing fails here with :class:`TorchIncompatible`, naming what
is missing, instead of somewhere deep inside a user's ``to_empty``.  The torch integration
turns that into a loud warning and leaves torch unpatched (``tests/test_compat.py`` checks
every name on the torch under test).

Known to work on torch 2.13.0 (CPU) and 2.14.1 (CUDA build), checked 2026-12-01.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch

_Resolved = TypeVar("_Resolved")


class TorchIncompatible(ImportError):
    """This torch lacks a private API bufferfix relies on."""


def _resolve(description: str, get: Callable[[], _Resolved]) -> _Resolved:
    try:
        return get()
    except (AttributeError, ImportError) as error:
        raise TorchIncompatible("bufferfix needs %s, which torch %s does not have (%s); bufferfix cannot restore "
                                "buffers with this torch" % (description, torch.__version__, error)) from None


# Each name below is what the rest of bufferfix imports; NAMES lists them for the test.
parse_to = _resolve("torch._C._nn._parse_to (the device of a Module.to(...) call)",
                    lambda: torch._C._nn._parse_to)
function_mode_stack_length = _resolve("torch._C._len_torch_function_stack",
                                      lambda: torch._C._len_torch_function_stack)
function_mode_at = _resolve("torch._C._get_function_stack_at", lambda: torch._C._get_function_stack_at)
# The classes, as mypy sees them: the same ones, imported (at run time they are resolved as the rest).
if TYPE_CHECKING:
    from torch.utils._device import DeviceContext
else:
    DeviceContext = _resolve("torch.utils._device.DeviceContext (`with torch.device(...)` as a mode)",
                             lambda: __import__("torch.utils._device", fromlist=["_"]).DeviceContext)
global_device_context = _resolve("torch._GLOBAL_DEVICE_CONTEXT (torch.set_default_device)",
                                 lambda: torch._GLOBAL_DEVICE_CONTEXT)
if TYPE_CHECKING:
    from torch.overrides import TorchFunctionMode
    from torch.utils.weak import WeakIdKeyDictionary
else:
    WeakIdKeyDictionary = _resolve("torch.utils.weak.WeakIdKeyDictionary",
                                   lambda: __import__("torch.utils.weak", fromlist=["_"]).WeakIdKeyDictionary)
    TorchFunctionMode = _resolve("torch.overrides.TorchFunctionMode", lambda: torch.overrides.TorchFunctionMode)
reconstruct = _resolve("copy._reconstruct (what Module.__deepcopy__ delegates to)",
                       lambda: copy._reconstruct)  # type: ignore[attr-defined]  # private: not in typeshed's copy


NAMES = ("parse_to", "function_mode_stack_length", "function_mode_at", "DeviceContext", "global_device_context",
         "WeakIdKeyDictionary", "TorchFunctionMode", "reconstruct")


def device_context() -> DeviceContext | None:
    """The DeviceContext that sets the default device, or None (the default device is CPU).

    Asked for every module constructed on meta, so it walks the mode stack in place instead of
    building it as a list (what ``torch.get_default_device()`` does, plus a tensor allocation).
    """
    for index in range(function_mode_stack_length() - 1, -1, -1):
        mode = function_mode_at(index)
        if isinstance(mode, DeviceContext):
            return mode
    return vars(global_device_context).get("device_context")  # getattr's default raises inside
