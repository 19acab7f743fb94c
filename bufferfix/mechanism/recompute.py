"""The user's own rules: recompute functions and classes that must never be replayed; and an
integration's verdict that some of a class's buffers cannot be recovered at all."""
from typing import Callable, Dict, Iterable, Optional, Tuple, Type

from ..recovery import Reason

_recompute_functions: Dict[type, Callable] = {}  # class -> fn(module) -> {name: tensor}
_never_replay = set()  # classes whose constructors must not be re-run
_unrecoverable: Dict[type, Tuple[Reason, Tuple[str, ...]]] = {}  # class -> (why, its attributes it covers)


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


def declare_unrecoverable(cls: Type, attributes: Iterable[str], reason: Reason) -> None:
    """The tensors under ``cls``'s ``attributes`` (buffers, or child modules such as a BufferDict)
    cannot be recovered, for ``reason``: they are reported with it instead of whatever a replay of
    an ancestor gives (an integration's verdict, e.g. a value computed from a pretrained weight)."""
    _unrecoverable[cls] = (reason, tuple(attributes))


def undeclare_unrecoverable(cls: Type) -> None:
    _unrecoverable.pop(cls, None)


def declared_unrecoverable(cls: Type, relative: str) -> Optional[Reason]:
    """The declared reason for the tensor at ``relative`` (a path under a ``cls`` module), if any."""
    for klass in cls.__mro__:
        reason, attributes = _unrecoverable.get(klass, (None, ()))
        if relative.partition(".")[0] in attributes:
            return reason
    return None
