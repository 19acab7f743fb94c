"""The rules the recovery loop follows, as data: the user's recompute functions and classes that
must never be replayed; an integration's verdict that some of a class's buffers cannot be
recovered at all; and the classes an integration says may lack, on meta, buffers their
constructor registers elsewhere (torchtune's ``rope_init()``)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ..recovery import Reason

if TYPE_CHECKING:
    import torch

# fn(module) -> {name: tensor}.  The module is an instance of the class it is registered for, which a
# Callable type cannot tie to that class: Any, so that fn may name the class (def fn(m: MyRotary)).
RecomputeFunction = Callable[[Any], "Mapping[str, torch.Tensor] | None"]
_Recompute = TypeVar("_Recompute", bound=RecomputeFunction)
recompute_functions: dict[type, RecomputeFunction] = {}  # class -> fn(module) -> {name: tensor}
never_replayed: set[type] = set()  # classes whose constructors must not be re-run
unrecoverable: dict[type, tuple[Reason, tuple[str, ...]]] = {}  # class -> (why, its attributes it covers)


@overload
def register_recompute(cls: type, fn: None = None) -> Callable[[_Recompute], _Recompute]: ...


@overload
def register_recompute(cls: type, fn: _Recompute) -> _Recompute: ...


def register_recompute(cls: type, fn: RecomputeFunction | None = None
                       ) -> RecomputeFunction | Callable[[RecomputeFunction], RecomputeFunction]:
    """Register ``fn(module) -> {buffer name: tensor}`` computing ``cls``'s non-persistent buffers.

    ``fn`` receives the materialised module and may return values on any device
    and dtype; bufferfix moves and casts them to the materialised buffer.  It
    wins over constructor replay, for ``cls`` and its subclasses.  Usable as a
    decorator: ``@bufferfix.register_recompute(MyRotary)``.
    """
    if fn is None:
        return lambda function: register_recompute(cls, function)
    recompute_functions[cls] = fn
    return fn


def unregister_recompute(cls: type) -> None:
    recompute_functions.pop(cls, None)


def never_replay(cls: type) -> type:
    """Never re-run ``cls``'s constructor (e.g. it has side effects); its buffers are then reported
    as unrecoverable unless a recompute function is registered."""
    never_replayed.add(cls)
    return cls


def registered_recompute(cls: type) -> RecomputeFunction | None:
    for klass in cls.__mro__:
        fn = recompute_functions.get(klass)
        if fn is not None:
            return fn
    return None


def declare_unrecoverable(cls: type, attributes: Iterable[str], reason: Reason) -> None:
    """The tensors under ``cls``'s ``attributes`` (buffers, or child modules such as a BufferDict)
    cannot be recovered, for ``reason``: they are reported with it instead of whatever a replay of
    an ancestor gives (an integration's verdict, e.g. a value computed from a pretrained weight)."""
    unrecoverable[cls] = (reason, tuple(attributes))


def undeclare_unrecoverable(cls: type) -> None:
    unrecoverable.pop(cls, None)


def declared_unrecoverable(cls: type, relative: str) -> Reason | None:
    """The declared reason for the tensor at ``relative`` (a path under a ``cls`` module), if any."""
    for klass in cls.__mro__:
        reason, attributes = unrecoverable.get(klass, (None, ()))
        if relative.partition(".")[0] in attributes:
            return reason
    return None


expecting: list[Callable[[type], bool]] = []  # predicates cls -> bool, from integrations
_expects: dict[type, bool] = {}  # class -> does some predicate name it (asked for every module planned)


def expect_buffers(predicate: Callable[[type], bool]) -> None:
    """Modules whose class ``predicate(cls)`` accepts may lack, on meta, buffers their constructor
    registers elsewhere: they are registered after materialisation, as the normal build has them."""
    expecting.append(predicate)
    _expects.clear()


def forget_expectation(predicate: Callable[[type], bool]) -> None:
    if predicate in expecting:
        expecting.remove(predicate)
    _expects.clear()


def expects_buffers(cls: type) -> bool:
    if not expecting:
        return False
    verdict = _expects.get(cls)
    if verdict is None:
        verdict = _expects[cls] = any(_safe(predicate, cls) for predicate in expecting)
    return verdict


def _safe(predicate: Callable[[type], bool], cls: type) -> bool:
    try:
        return bool(predicate(cls))
    except Exception:  # noqa: BLE001 - an integration's predicate must not break planning
        return False
