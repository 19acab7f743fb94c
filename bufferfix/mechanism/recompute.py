"""The user's own rules: recompute functions and classes that must never be replayed."""
from typing import Callable, Dict, Optional, Type

_recompute_functions: Dict[type, Callable] = {}  # class -> fn(module) -> {name: tensor}
_never_replay = set()  # classes whose constructors must not be re-run


def register_recompute(cls: Type, fn: Optional[Callable] = None):
    """Register ``fn(module) -> {buffer name: tensor}`` computing ``cls``'s non-persistent buffers.

    ``fn`` receives the materialised module and may return values on any device
    and dtype; bufferfix moves and casts them to the materialised buffer.  It
    wins over constructor replay, for ``cls`` and its subclasses.  Usable as a
    decorator: ``@bufferfix.register_recompute(MyRotary)``.
    """
    if fn is None:
        return lambda function: register_recompute(cls, function)
    _recompute_functions[cls] = fn
    return fn


def unregister_recompute(cls: Type) -> None:
    _recompute_functions.pop(cls, None)


def never_replay(cls: Type) -> Type:
    """Never re-run ``cls``'s constructor (e.g. it has side effects); its buffers are then reported
    as unrecoverable unless a recompute function is registered."""
    _never_replay.add(cls)
    return cls


def registered_recompute(cls: Type) -> Optional[Callable]:
    for klass in cls.__mro__:
        fn = _recompute_functions.get(klass)
        if fn is not None:
            return fn
    return None


def forbids_replay(cls: Type) -> bool:
    return cls in _never_replay
