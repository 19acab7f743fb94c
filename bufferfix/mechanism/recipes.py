"""Recipes and replay: a meta-built module's constructor call, re-run on CPU when a buffer needs it.

A buffer created while ``meta`` is the default device never held a value, so
there is nothing to snapshot.  What we can keep is the constructor call that
produced it (see :mod:`.recording`): the class, the arguments, and the default
dtype at the time.  At materialisation the constructor is re-run ("replayed") on
CPU with its parameters sent straight to meta (so no weight memory is touched),
and the non-persistent buffers are taken from the replayed module.  A constructor that
computes a buffer from a parameter, or on a parameter's device (timm's Swin ``attn_mask``),
gets it on meta or raises that way: that one recipe is replayed again with real parameters,
which are sent to meta as soon as it returns, so the transient memory is that module's
parameters (``replay(recipe, real_parameters=True)``).

Identical recipes are interned (80 identical decoder layers share one recipe) and
the replay result is cached on the recipe, so it is computed once and freed
together with the recipe once every module that used it has been materialised.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
import random
import sys
import threading
import types
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..recovery import Reason
from . import compat, recompute

if TYPE_CHECKING:
    from .slots import Slot

# (argument, copy of its attributes, argument, copy, ...): constructor arguments, of any kind (see argument_states)
ArgumentStates = tuple[Any, ...]


class _ThreadState(threading.local):
    replaying = False  # a class default: a missing thread-local attribute costs an exception
    real_parameters = False  # this replay keeps its parameters real (see replay)


_local = thread_state = _ThreadState()  # thread_state: read by the constructor hook (recording)
replays_running = 0  # replays running in any thread: the constructor hook reads _local only when not 0
logger = logging.getLogger("bufferfix")
_replay_lock = threading.RLock()

_version_offsets = compat.WeakIdKeyDictionary()  # deep-copied meta tensor -> writes its original had seen
_interned: weakref.WeakValueDictionary[tuple[object, ...], Recipe] = weakref.WeakValueDictionary()  # key -> Recipe


class ReplayError(Exception):
    """The recipe cannot produce the value a normal build would have: ``reason`` (a
    :class:`~bufferfix.recovery.Reason`) and ``detail`` say why."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


class Recipe:
    __slots__ = ("cls", "args", "kwargs", "default_dtype", "argument_states", "refusal", "_replayed",
                 "_replayed_real", "_replayed_on_meta", "__weakref__")

    def __init__(self, cls: type[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any], default_dtype: torch.dtype,
                 argument_states: ArgumentStates = (), refusal: str | None = None) -> None:
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.default_dtype = default_dtype
        # Arguments are kept by reference, so a config object changed after construction
        # would replay with its new values: each argument object's attributes as they were
        # at construction (a shallow copy of its __dict__; compared by identity, never ==),
        # flat: (argument, attributes, argument, attributes, ...).
        self.argument_states = argument_states
        self.refusal = refusal  # why this constructor must not be re-run, or None
        self._replayed: Replayed | ReplayError | None = None
        self._replayed_real: Replayed | ReplayError | None = None  # the same with real parameters (freed once it returned)
        self._replayed_on_meta: nn.Module | None = None  # a meta build, only to read version counters

    @property
    def origin(self) -> str:
        """``module.Class``: names the recipe in a :class:`~bufferfix.recovery.Recovery`."""
        return "%s.%s" % (self.cls.__module__, self.cls.__qualname__)

    def has_argument_states(self, states: ArgumentStates) -> bool:
        """Were the arguments, attribute by attribute, the same objects as in ``states``?"""
        return len(states) == len(self.argument_states) and all(
            value is other and _same_attributes(state, other_state)
            for (value, state), (other, other_state) in zip(_pairs(self.argument_states), _pairs(states)))

    def arguments_as_recorded(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` with every argument object that changed since construction replaced
        by a shallow copy holding its attributes as they were then."""
        restored: dict[int, Any] = {}
        for value, state in _pairs(self.argument_states):
            current = _state_of(value)
            assert current is not None  # kept with its state: a list, a dict or an object with a __dict__
            if not _same_attributes(current, state):
                restored[id(value)] = _as_recorded(value, state)
        args = tuple(restored.get(id(value), value) for value in self.args)
        kwargs = {name: restored.get(id(value), value) for name, value in self.kwargs.items()}
        return args, kwargs


# Recording runs for every module built on meta (thousands for a 70B model), so the helpers below
# look at type(value) and use object.__getattribute__: a failed isinstance() or a plain attribute
# read goes through the argument's own __getattribute__, which transformers' configs override.
_STATELESS = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, types.MethodType,
              functools.partial)


def _state_of(value: Any) -> dict[Any, Any] | None:  # an argument, of any kind
    """What is kept of an argument to see it change: a list's or a dict's entries, an argument
    object's attribute dict; None for values and callables."""
    kind = type(value)
    if kind in _VALUE_TYPE_SET or issubclass(kind, _STATELESS):
        return None
    if issubclass(kind, list):
        return dict(enumerate(value))
    if issubclass(kind, dict):
        return dict(value)
    if issubclass(kind, tuple):
        return None  # its entries cannot change (a list inside it is an argument of its own: not followed)
    try:
        state = object.__getattribute__(value, "__dict__")
    except AttributeError:
        return None
    return state if type(state) is dict else None


def _as_recorded(value: Any, state: dict[Any, Any]) -> Any:  # an argument, of any kind, and its copy
    """A copy of the argument ``value`` holding ``state`` (see :func:`_state_of`)."""
    if isinstance(value, list):
        duplicate: Any = copy.copy(value)
        duplicate[:] = list(state.values())
        return duplicate
    duplicate = copy.copy(value)
    if isinstance(value, dict):
        duplicate.clear()
        duplicate.update(state)
        return duplicate
    vars(duplicate).clear()
    vars(duplicate).update(state)
    return duplicate


def _same_attributes(current: dict[Any, Any], recorded: dict[Any, Any]) -> bool:
    """Identity, never ==: as many attributes, in the same order, each holding the very same object
    (names are not compared: a rename that keeps every value object in place is not a real edit)."""
    return len(current) == len(recorded) and all(map(operator.is_, current.values(), recorded.values()))


# --------------------------------------------------------------------------- replay state

def replaying() -> bool:
    return _local.replaying


_VALUE_TYPE_SET: frozenset[type] = frozenset((int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device))


def _recipe_key_part(value: Any) -> tuple[object, object]:  # an argument, of any kind
    """A hashable stand-in: plain values by value, anything else by identity.

    Identity is safe because an interned recipe holds its arguments alive.
    """
    kind = type(value)
    if kind in _VALUE_TYPE_SET or issubclass(kind, type):
        return (kind, value)
    if issubclass(kind, (tuple, list)):
        return (kind, tuple(_recipe_key_part(item) for item in value))
    if issubclass(kind, dict):
        return (dict, tuple((key, _recipe_key_part(item)) for key, item in value.items()))
    return ("id", id(value))


def _refusal(value: Any) -> str | None:  # an argument, of any kind
    """Why replaying a constructor called with this argument would be unsafe or wrong, or None."""
    kind = type(value)
    items = value.values() if issubclass(kind, dict) else value if issubclass(kind, (list, tuple)) else (value,)
    for item in items:
        if issubclass(type(item), nn.Module):
            # Re-running e.g. Wrapper(inner) would hand back (or mutate) the live, empty module.
            return "its constructor takes a module argument (%s), so re-running it cannot give fresh values" % type(item).__name__
        if issubclass(type(item), torch.Tensor) and item.is_meta:
            return "its constructor takes a meta tensor argument, whose values never existed"
    return None


_PLAIN, _CHECKED, _OBJECT = 0, 1, 2  # what an argument's type asks of argument_states
_argument_kinds: dict[type, int] = {}  # type -> one of the three, decided once per type
plain_argument_types: set[type] = set(_VALUE_TYPE_SET)  # the types classified _PLAIN (see recording.constructor_hook)


def _argument_kind(kind: type) -> int:
    if kind in _VALUE_TYPE_SET or issubclass(kind, _STATELESS):
        found = _PLAIN  # a value or a callable: nothing to keep
    elif issubclass(kind, (nn.Module, torch.Tensor, list, tuple, dict)):
        found = _CHECKED  # may hold a module or a meta tensor: see _refusal
    else:
        found = _OBJECT  # an argument object (a config): its attributes are kept
    if len(_argument_kinds) < 10000:  # classes made on the fly: do not keep them all
        _argument_kinds[kind] = found
        if found is _PLAIN:
            plain_argument_types.add(kind)
    return found


def argument_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ArgumentStates | str:
    """``(argument, copy of its attributes, argument, copy, ...)`` for argument objects (configs),
    or a refusal.  Flat: a record keeps fewer objects for the garbage collector to count and walk
    (see :func:`_pairs`).

    Runs for every module recorded that has an argument of a type not in
    :data:`plain_argument_types` (a config), hence each argument type is classified once."""
    states: ArgumentStates = ()
    kinds = _argument_kinds
    for value in (*args, *kwargs.values()) if kwargs else args:
        kind = kinds.get(type(value))
        if kind is _PLAIN:
            continue
        if kind is None:
            kind = _argument_kind(type(value))
            if kind is _PLAIN:
                continue
        if kind is _CHECKED:
            refusal = _refusal(value)
            if refusal is not None:
                return refusal
            if isinstance(value, (list, dict)):  # its entries may change after the call: kept as they were
                states += (value, _state_of(value))
            continue
        try:
            state = _generic_getattr(value, "__dict__")  # not the argument's own __getattribute__
        except AttributeError:  # __slots__ only: nothing to keep
            continue
        if type(state) is dict:
            states += (value, state.copy())
    return states


def _pairs(states: ArgumentStates) -> Iterable[tuple[Any, Any]]:
    """``(argument, its attributes)`` pairs of a flat :func:`argument_states` tuple."""
    return zip(states[::2], states[1::2])


_generic_getattr = object.__getattribute__


def intern(cls: type[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any], default_dtype: torch.dtype,
           states: ArgumentStates | str) -> Recipe:
    """One Recipe for identical constructor calls (80 decoder layers, one replay)."""
    if type(states) is str:
        return Recipe(cls, (), {}, default_dtype, refusal=states)
    assert isinstance(states, tuple)  # not a refusal (a str): argument states
    # Plain values compare by value, argument objects by identity (held alive by the recipe).
    key = (cls, default_dtype, _recipe_key_part(args), _recipe_key_part(kwargs))
    recipe = _interned.get(key)
    if recipe is None or not recipe.has_argument_states(states):  # a config changed in between
        recipe = _interned[key] = Recipe(cls, args, kwargs, default_dtype, states)
    return recipe


def follow_tensor_copy(original: torch.Tensor, copy: torch.Tensor) -> None:
    """A deep copy starts with a fresh version counter; carry the writes the original had seen, so
    that "written in place after construction" stays detectable (see version_at_construction)."""
    offset = effective_version(original) - raw_version(copy)
    if offset:
        _version_offsets[copy] = offset


def effective_version(tensor: torch.Tensor) -> int:
    return raw_version(tensor) + _version_offsets.get(tensor, 0)


def raw_version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return 0


# --------------------------------------------------------------------------- replay

def parameters_to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    """During a replay, parameters go straight to meta (only the buffers are wanted, so no weight
    memory is touched): the parameter to register instead, or None to keep ``param``."""
    if not replays_running or not _local.replaying or _local.real_parameters or param is None or param.is_meta:
        return None  # the cheapest checks first: other threads' registrations pass through here too
    if type(param) is nn.Parameter:
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    try:  # Parameter subclasses keep their extra state, as accelerate's init_on_device does
        state = dict(param.__dict__, requires_grad=param.requires_grad)
        return type(param)(param.detach().to("meta"), **state)
    except Exception:  # noqa: BLE001 - a subclass that cannot be rebuilt so keeps its real value
        return None


def _put_parameters_on_meta() -> None:
    """Put :func:`parameters_to_meta` in front of ``nn.Module.register_parameter`` while replays
    run (from the outermost one, under the replay lock).  Only then: a global parameter-registration
    hook would cost every parameter of every model built ~1,700 instructions (a 70B Llama: 1.2 M).

    The class attribute is replaced the way accelerate's ``init_empty_weights()`` replaces it, so
    the two nest: each installation is a new function that calls the one it displaced.  An
    accelerate context entered in another thread during a replay puts its own on top and, when it
    exits, puts this one back: left in place, it passes every call on, and takes itself off at the
    first call made while no replay runs."""
    displaced = nn.Module.__dict__["register_parameter"]

    def register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if not replays_running:
            _take_parameters_off_meta()
        converted = parameters_to_meta(self, name, param)
        return displaced(self, name, param if converted is None else converted)

    # a mark on the function, also read by recording.parameters_put_on_meta
    register_parameter.bufferfix_displaced = displaced  # type: ignore[attr-defined]
    nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]  # as accelerate does


def _take_parameters_off_meta() -> None:
    """Undo :func:`_put_parameters_on_meta`, as far as its functions are on top (one under an
    accelerate context's stays until that context puts it back on top)."""
    if not _replay_lock.acquire(blocking=False):
        return  # a replay is starting or running in another thread: it takes them off when done
    try:
        current: Any = nn.Module.__dict__.get("register_parameter")  # ours, accelerate's or torch's own
        while not replays_running and getattr(current, "bufferfix_displaced", None) is not None:
            current = current.bufferfix_displaced
            nn.Module.register_parameter = current  # type: ignore[method-assign]  # the one it displaced
    finally:
        _replay_lock.release()


@contextlib.contextmanager
def _isolated(default_dtype: torch.dtype, device: str = "cpu") -> Iterator[None]:
    """Run a constructor on ``device`` under ``default_dtype`` and leave no trace on global state.
    Holds the replay lock (re-entrant): replays fork the global RNG and count themselves."""
    global replays_running
    with _replay_lock:
        previous = replaying()
        previous_dtype = torch.get_default_dtype()
        python_rng = random.getstate()
        numpy: Any = sys.modules.get("numpy")  # not a dependency: its generator is kept only when imported
        numpy_rng = numpy.random.get_state() if numpy is not None else None
        _local.replaying = True
        replays_running += 1
        try:
            if replays_running == 1:
                _put_parameters_on_meta()
            # A device context sends every torch call through Python (~50 us per replay): skip it when
            # the default device is already the one wanted.
            on_device = (contextlib.nullcontext() if device == "cpu" and compat.device_context() is None
                         else torch.device(device))
            with torch.random.fork_rng(devices=[]), on_device:
                torch.set_default_dtype(default_dtype)
                yield
        finally:
            torch.set_default_dtype(previous_dtype)
            random.setstate(python_rng)
            if numpy_rng is not None:
                numpy.random.set_state(numpy_rng)
            _local.replaying = previous
            replays_running -= 1
            if not replays_running:
                _take_parameters_off_meta()


class _Draws(compat.TorchFunctionMode):
    """While a replay runs: the tensors holding values drawn from the default generator, or computed
    from such values (written in place by them too).  Only draws that depend on the seed count:
    the generator's state before each draw is compared with the one before the same draw in a
    build from another seed (``reference``, that build's :attr:`states`), so a draw after the
    constructor seeded the generator itself is not one.  Unlike a comparison of values, this tells
    a random bool or integer tensor that comes out the same from both seeds."""

    def __init__(self, reference: list[torch.Tensor] | None = None) -> None:
        super().__init__()
        self.reference = reference
        self.states: list[torch.Tensor] = []  # the generator's state before each draw, in order
        # Tensors without memory (meta) by identity; others by their memory, which views and a
        # Parameter made of the tensor share: data pointer -> the storage (held, so none is reused).
        self.drawn = compat.WeakIdKeyDictionary()
        self.storages: dict[int, Any] = {}

    def __contains__(self, tensor: torch.Tensor) -> bool:
        storage = _storage(tensor)
        return storage.data_ptr() in self.storages if storage is not None else tensor in self.drawn

    def _mark(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is not None:
            self.storages[storage.data_ptr()] = storage
        else:
            self.drawn[tensor] = True

    def __torch_function__(self, func: Any, types: Iterable[type], args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        before = torch.default_generator.get_state()
        result = func(*args, **kwargs)
        drawn = False
        if not torch.equal(before, torch.default_generator.get_state()):
            index = len(self.states)
            self.states.append(before)
            reference = self.reference
            drawn = reference is None or index >= len(reference) or not torch.equal(before, reference[index])
        inputs = list(_tensors((*args, *kwargs.values())))
        if not drawn and (self.drawn or self.storages):
            drawn = any(tensor in self for tensor in inputs)
        if drawn:
            name = getattr(func, "__name__", "")
            written = inputs[:1] if name == "__setitem__" or "out" in kwargs or (
                name.endswith("_") and not name.startswith("_")) else []
            for tensor in (*_tensors((result,)), *written):
                self._mark(tensor)
                if tensor._base is not None:  # a meta view written: its base holds the draw too
                    self._mark(tensor._base)
        return result


def _storage(tensor: torch.Tensor) -> Any:
    """The tensor's memory, if it has any (not meta, not sparse, not empty)."""
    if tensor.is_meta:
        return None
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, or a subclass without one
        return None
    return storage if storage.data_ptr() else None


def _tensors(values: Iterable[Any]) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (item for item in value if isinstance(item, torch.Tensor))


def _construct(recipe: Recipe, seed: int, real_parameters: bool = False,
               draws: _Draws | None = None) -> tuple[nn.Module, bool]:
    previous = _local.real_parameters
    _local.real_parameters = real_parameters
    try:
        with _isolated(recipe.default_dtype):
            torch.default_generator.manual_seed(seed)  # torch.manual_seed goes through dynamo: ~0.2 ms
            before = torch.get_rng_state()
            args, kwargs = recipe.arguments_as_recorded()
            with draws if draws is not None else contextlib.nullcontext():
                module = recipe.cls(*args, **kwargs)
            drew_random = not torch.equal(before, torch.get_rng_state())
    finally:
        _local.real_parameters = previous
    if real_parameters:
        freed = _free_parameters(module)
        logger.debug("bufferfix: replayed %s with real parameters (%d bytes, freed)", recipe.origin, freed)
    return module, drew_random


def _free_parameters(module: nn.Module) -> int:
    """Send a replayed module's real parameters to meta at once (only its buffers are wanted);
    returns their bytes: the transient memory that replay cost."""
    freed = 0
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                freed += param.numel() * param.element_size()
                sub._parameters[name] = nn.Parameter(torch.empty_like(param, device="meta"),
                                                     requires_grad=param.requires_grad)
    return freed


def version_at_construction(recipe: Recipe, path: str, slot: Slot) -> int | None:
    """The version counter the tensor at ``slot`` of the module at ``path`` (under the module
    ``recipe`` builds) has when its constructor returns *on meta*.

    A live meta tensor with a higher count was changed in place after construction, so no
    replay can know its value.  The count is read from a meta build because some operations
    bump it differently on CPU (``copy.deepcopy`` does on CPU, not on meta).
    """
    if recipe._replayed_on_meta is None:
        try:
            with _isolated(recipe.default_dtype, device="meta"):
                args, kwargs = recipe.arguments_as_recorded()
                recipe._replayed_on_meta = recipe.cls(*args, **kwargs)
        except Exception:  # noqa: BLE001 - the CPU replay already worked; nothing more to learn
            return None
    try:
        owner = recipe._replayed_on_meta.get_submodule(path)
    except AttributeError:
        return None
    tensor = slot.read(owner)
    return effective_version(tensor) if tensor is not None else None


class Replayed:
    """A replay: ``module``, a fresh CPU build, and when its constructor used the random number
    generator, ``others``: builds from another seed, and with real parameters (whose
    initialisation draws from the generator in a normal build and not in a replay), and
    ``drawn``: what the first of them holds that came from the generator (a :class:`_Draws`)."""

    __slots__ = ("module", "others", "drawn")

    def __init__(self, module: nn.Module, others: tuple[nn.Module, ...] = (), drawn: Any = None) -> None:
        self.module, self.others, self.drawn = module, others, drawn

    def randomised(self, path: str, slot: Slot) -> bool:
        """Does the value at ``slot`` of the module at ``path`` depend on the random number generator?"""
        if not self.others:
            return False
        value = _read(self.module, path, slot)
        if value is None or value.is_meta:
            return False
        drawn = _read(self.others[0], path, slot)
        if self.drawn is not None and drawn is not None and drawn in self.drawn:
            return True
        for other in self.others:
            again = _read(other, path, slot)
            if again is None or again.is_meta or again.shape != value.shape or not torch.equal(again, value):
                return True
        return False


def _read(module: nn.Module, path: str, slot: Slot) -> torch.Tensor | None:
    try:
        return slot.read(module.get_submodule(path) if path else module)
    except AttributeError:
        return None


def replay(recipe: Recipe, real_parameters: bool = False) -> Replayed:
    """The recipe's :class:`Replayed`.  Raises :class:`ReplayError`.

    Parameters are sent to meta as they are registered, unless ``real_parameters``: then they
    are real while the constructor runs (a buffer computed from one, or on its device, comes out
    right) and sent to meta as soon as it returns."""
    slot = "_replayed_real" if real_parameters else "_replayed"
    cached = getattr(recipe, slot)
    if cached is None:
        with _replay_lock:  # replays fork the global RNG: two at once would see each other's draws
            cached = getattr(recipe, slot)
            if cached is None:
                cached = _replay_uncached(recipe, real_parameters=True) if real_parameters else _replay_uncached(recipe)
                # A constructor that raised may work next time (memory freed, a retry): not kept.
                if not (isinstance(cached, ReplayError) and cached.reason is Reason.REPLAY_RAISED):
                    setattr(recipe, slot, cached)
    if isinstance(cached, ReplayError):
        raise cached
    return cached


def _replay_uncached(recipe: Recipe, real_parameters: bool = False) -> Replayed | ReplayError:
    if recipe.refusal:
        return ReplayError(Reason.REFUSED, recipe.refusal)
    if recipe.cls in recompute.never_replayed:
        return ReplayError(Reason.NEVER_REPLAY)
    try:
        module, drew_random = _construct(recipe, seed=0, real_parameters=real_parameters)
        others: tuple[nn.Module, ...] = ()
        draws = None
        if drew_random:
            # The constructor used the RNG: a value computed from a draw that depends on the seed,
            # or that differs in a build whose parameter initialisation draws as a normal build's
            # does, came from it.
            reference = _Draws()
            _construct(recipe, seed=0, real_parameters=real_parameters, draws=reference)
            draws = _Draws(reference.states)
            others = (_construct(recipe, seed=1, real_parameters=real_parameters, draws=draws)[0],)
            draws.states = draws.reference = []  # the marks are what is kept
            if not real_parameters:
                others += (_construct(recipe, seed=0, real_parameters=True)[0],)
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported, not raised
        return ReplayError(Reason.REPLAY_RAISED, "%s: %s" % (type(error).__name__, error))
    return Replayed(module, others, draws)
