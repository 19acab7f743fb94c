"""``inspect.signature`` of module classes, as if bufferfix's ``__new__``s were not there.

Recording puts two kinds of ``__new__`` on module classes, and ``inspect`` can take either for
the constructor's signature:

* ``object.__new__`` in each torch.nn leaf class's own dict (see
  ``recording.keep_c_constructor``).  Python 3.10's ``inspect`` takes a class's own ``__new__``
  first, finds it built in, and raises ``ValueError: no signature found for builtin type``
  for ``nn.Linear``; 3.11+ looks past it to ``__init__``.
* the recording hook, ``(cls, *args, **kwargs)``, on ``nn.Module`` and on classes made from a leaf
  class (``class MyNorm(nn.LayerNorm)``).  On every version ``inspect`` gives ``(*args, **kwargs)``
  for such a class; on 3.10 also for any module class that inherits its ``__init__``.

Module classes get a ``__signature__`` that ``inspect`` reads before anything else.  It repeats
the running Python's own choice between ``__new__`` and ``__init__`` twice, once as the classes
are and once without bufferfix's ``__new__``s.  Where the two choices agree it is None, which
``inspect`` takes for no ``__signature__``, and goes on as it would have, options included;
where they differ it is the signature of the choice made without them.  On instances it is None
(``inspect.signature(module)`` is ``__call__``'s).  It is never an ``AttributeError``: it is in
``dir()`` of every module, and code such as torch.compile's reads every name there.  The C
constructor slots stay as they are.
"""
from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

# what inspect takes for built in, not "user-defined" (inspect._NonUserDefinedCallables)
_BUILT_IN = (types.WrapperDescriptorType, types.MethodWrapperType, types.ClassMethodDescriptorType,
             types.BuiltinFunctionType)
_OWN_NEW_FIRST = sys.version_info < (3, 11)  # 3.10: a class's own __new__ or __init__, then inherited ones


def keep_signatures(leaf_classes: Iterable[type], is_hook: Callable[[object], bool]) -> None:
    """Give ``nn.Module`` (and so every module class) the ``__signature__`` described above;
    ``leaf_classes`` are the classes whose ``object.__new__`` is bufferfix's, ``is_hook(new)``
    says whether a ``__new__`` is the recording hook."""
    nn.Module.__signature__ = _ConstructorSignature(  # type: ignore[attr-defined]  # torch's Module has none
        frozenset(leaf_classes), is_hook)


class _ConstructorSignature:
    """A ``__signature__`` computed on each look-up from the class it is looked up on."""

    def __init__(self, leaf_classes: frozenset[type], is_hook: Callable[[object], bool]) -> None:
        self.leaf_classes, self.is_hook = leaf_classes, is_hook

    def __get__(self, instance: object, cls: type) -> inspect.Signature | None:
        if instance is not None or _user_defined(type(cls).__call__):
            return None  # an instance; or a metaclass __call__, which inspect reads first
        chosen = _factory_method(cls, self._own_new)
        unhooked = _factory_method(cls, self._own_new_unhooked)
        if chosen is unhooked or unhooked is None:
            return None
        return inspect.signature(types.MethodType(unhooked, cls))  # the first parameter (cls / self) bound

    # A class's own __new__ (and below its __init__), read from its __dict__: a function, a staticmethod
    # or a built-in slot; Any, as typeshed types __dict__.
    @staticmethod
    def _own_new(base: type) -> Any:
        return base.__dict__.get("__new__")

    def _own_new_unhooked(self, base: type) -> Any:
        new = base.__dict__.get("__new__")
        if (new is object.__new__ and base in self.leaf_classes) or self.is_hook(new):
            return None
        return new


def _factory_method(cls: type, own_new: Callable[[type], Any]) -> Any:
    """The ``__new__`` or ``__init__`` whose signature this Python's ``inspect`` gives for ``cls``
    (None: neither is user-defined), seeing the ``__new__`` that ``own_new(base)`` says each class
    of the MRO has in its own dict."""
    new = next((_unwrapped(found) for found in map(own_new, cls.__mro__) if found is not None), None)
    new = new if _user_defined(new) else None
    init = getattr(cls, "__init__", None)
    init = init if _user_defined(init) else None
    if _OWN_NEW_FIRST:
        if own_new(cls) is not None:
            return new
        if "__init__" in cls.__dict__:
            return init
        return new or init
    for base in cls.__mro__:
        if new is not None and own_new(base) is not None:
            return new
        if init is not None and "__init__" in base.__dict__:
            return init
    return None


def _unwrapped(new: Any) -> Any:
    return new.__func__ if isinstance(new, staticmethod) else new


def _user_defined(method: object) -> bool:
    return method is not None and not isinstance(method, _BUILT_IN)
