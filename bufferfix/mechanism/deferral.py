"""Deferral: values only a constructor replay can give, held back while a library's own
initialisation runs right after the materialisation.

transformers' ``_init_weights`` recomputes the buffers of its own models, so replaying them
too would be wasted work.  Inside :meth:`DeferredRestore.watching`, a buffer the
initialisation overwrites whole (``copy_``, ``fill_``, ``normal_``, ...) is left to it; a
buffer it touches in any other way (reads it, writes part of it, takes ``.data``) is filled
first, so it never sees uninitialised memory.  :meth:`DeferredRestore.finish` fills whatever
the initialisation did not overwrite and returns what could not be recovered; it must run
even when the initialisation raised.  A buffer left to the initialisation whose version counter
did not move (a function that skips some tensors, as transformers' own ``constant_`` does for
those it marks initialised) is filled then too: a skipped write never leaves garbage.

Which functions overwrite a tensor whole is data (:data:`overwriting`): torch's, and those an
integration adds (transformers swaps its own in for ``torch.nn.init``'s while ``_init_weights`` runs).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch

from ..recovery import Recovery
from . import compat, recipes
from .slots import Slot


class _Group(Protocol):
    """A planned group of slots (``restore._Group``), as far as the deferral reads it."""

    @property
    def buffers(self) -> list[Slot]: ...


class _Plan(Protocol):
    """The materialisation plan (``restore.Materialisation``), as far as the deferral uses it."""

    recovered: list[Recovery]

    def fill(self, group: Any, target: torch.Tensor | None, failures: list[Recovery],
             device: torch.device | None = None) -> None: ...

    def left_to_the_library(self, target: torch.Tensor) -> None: ...

    def finish(self, failures: list[Recovery]) -> list[Recovery]: ...


# torch's functions and methods, as a mode sees them: any signature
TorchFunction = Callable[..., Any]


class DeferredRestore:
    """``(group, target)`` pairs of a :class:`~.restore.Materialisation` still waiting for a value."""

    def __init__(self, plan: _Plan, pending: Iterable[tuple[_Group, torch.Tensor]],
                 failures: list[Recovery]) -> None:
        self.plan = plan
        self.pending = {id(target): (group, target) for group, target in pending}
        self.failures = failures
        self.left: list[tuple[_Group, torch.Tensor, int]] = []  # (group, target, its version before the library's write)

    def watching(self) -> _FirstUse:
        return _FirstUse(self)

    def fill(self, key: int) -> None:
        group, target = self.pending.pop(key)
        with torch.no_grad():
            self.plan.fill(group, target, self.failures)

    def left_to_the_library(self, key: int) -> None:
        group, target = self.pending.pop(key)
        self.left.append((group, target, recipes.raw_version(target)))

    def finish(self) -> list[Recovery]:
        for group, target, version in self.left:
            if recipes.raw_version(target) != version:
                self.plan.left_to_the_library(target)  # written whole: its value stands
            elif group.buffers[0].read() is target:
                self.pending[id(target)] = (group, target)  # the write was skipped: filled below
        self.left.clear()
        for key, (group, target) in list(self.pending.items()):
            if group.buffers[0].read() is not target:
                continue  # the initialisation registered a tensor of its own there: its value stands
            self.fill(key)
        self.pending.clear()
        return self.plan.finish(self.failures)


def _overwriting_functions() -> frozenset[TorchFunction]:
    """Functions that overwrite every element of their first argument without reading it."""
    tensor_methods = ("copy_", "fill_", "zero_", "normal_", "uniform_")
    init_functions = ("normal_", "uniform_", "trunc_normal_", "zeros_", "ones_", "constant_")
    return frozenset([getattr(torch.Tensor, name) for name in tensor_methods]
                     + [getattr(torch.nn.init, name) for name in init_functions if hasattr(torch.nn.init, name)])


def _metadata_functions() -> frozenset[TorchFunction]:
    """Functions on a tensor that do not look at its values."""
    properties = ("shape", "dtype", "device", "is_meta", "ndim", "requires_grad", "layout", "is_cuda", "is_leaf",
                  "grad_fn", "names")
    methods = ("size", "dim", "numel", "element_size", "stride", "is_contiguous", "__len__", "nelement",
               "get_device", "is_floating_point", "is_complex")
    return frozenset([getattr(torch.Tensor, name).__get__ for name in properties if hasattr(torch.Tensor, name)]
                     + [getattr(torch.Tensor, name) for name in methods if hasattr(torch.Tensor, name)])


overwriting: set[TorchFunction] = set(_overwriting_functions())  # integrations add theirs
_METADATA = _metadata_functions()


class _FirstUse(compat.TorchFunctionMode):
    def __init__(self, deferred: DeferredRestore) -> None:
        super().__init__()
        self.deferred = deferred

    def __torch_function__(self, func: TorchFunction, types: Iterable[type], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        pending = self.deferred.pending
        if pending and func not in _METADATA:
            for position, value in enumerate(_arguments(args, kwargs)):
                if id(value) in pending:
                    if position == 0 and func in overwriting:
                        self.deferred.left_to_the_library(id(value))
                    else:
                        self.deferred.fill(id(value))
        return func(*args, **kwargs)


def _arguments(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Iterator[Any]:
    """Positional arguments first (position 0 is ``self`` for a tensor method), then the rest;
    tensors inside lists and tuples too."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield None  # keeps position 0 meaning "the first argument itself"
            yield from value
        else:
            yield value


