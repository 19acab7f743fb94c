"""Recording: which modules were built on meta, how, and where they sit in their model.

Every module constructed while meta is the default device (thousands for a 70B model) is
recorded from ``nn.Module.__new__``, so recording must cost next to nothing: the raw call
is kept, and turned into an interned :class:`~bufferfix.mechanism.recipes.Recipe` only if
one of its buffers ever needs recomputing.  Records live in a side table keyed by
``id(module)`` with a weak reference, never on the module, so pickling / ``torch.save`` /
``state_dict`` see nothing.

This module also owns the records' lifetimes: a record goes once its module is
materialised, and for modules materialised one at a time (FSDP1's ``param_init_fn``) a
parent keeps its record until every descendant still on meta has been materialised,
since a buffer its constructor put on a child can only come from replaying the parent.
"""
from __future__ import annotations

import itertools
import logging
import operator
import sys
import threading
import types
import weakref
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any, Protocol, cast

import torch
from torch import nn

from . import compat, recipes, signatures, snapshots
from .slots import MODULE_STATE

# The raw construction the hook keeps: (weakref to the module, class, args, kwargs or None, default dtype,
# argument states: see recipes.argument_states).  The arguments are whatever the constructor takes.
RawRecord = tuple["weakref.ref[nn.Module]", type, tuple[Any, ...], "dict[str, Any] | None", torch.dtype,
                  "tuple[Any, ...] | str"]
Record = tuple["weakref.ref[nn.Module]", "recipes.Recipe"] | RawRecord


class Switch(Protocol):
    active: bool  # records are made only while it is true (the torch integration)


class ConstructorHook(Protocol):
    """What :func:`constructor_hook` gives: the ``nn.Module.__new__`` function, and its marks."""

    bufferfix_hook: str
    hooked_classes: set[type]

    def __call__(self, cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module: ...


logger = logging.getLogger("bufferfix")
_recorded: dict[int, Record] = {}  # id(module) -> (weakref to the module, Recipe) or the raw construction
_PRUNE_AT_LEAST = 4096
_prune_at = _PRUNE_AT_LEAST
# id(child) -> (weakref to parent, attribute), built when first asked for
_parent_index: dict[int, tuple[weakref.ref[nn.Module], str]] | None = None
# id(module) -> [weakref to the module, descendants still on meta]: a list, counted down in place
_awaiting: dict[int, list[Any]] = {}


# --------------------------------------------------------------------------- is this module born on meta?

def constructor_hook(switch: Switch, unrecorded_classes: Collection[type]) -> ConstructorHook:
    """The ``nn.Module.__new__`` that records constructions born (partly) on meta.

    Every module of every model is constructed through it, on meta or not (a 70B model: a
    thousand modules in ~70 ms), so it is one flat function with its lookups bound in advance
    (benchmarks/README.md gives what it costs, and where).  It records while
    ``switch.active`` is true, never for ``unrecorded_classes`` (see :func:`torch_nn_own_classes`),
    never in a replay, and when the module is born (partly) on meta:

    * meta is the default device (``with torch.device("meta")``, ``set_default_device``): see
      :func:`meta_is_default_device`;
    * ``nn.Module.register_parameter`` is replaced by one that puts parameters on meta
      (accelerate's ``init_empty_weights()`` / ``init_on_device("meta")`` and transformers' copy
      of them): buffers stay real there, but one computed from a parameter or on a parameter's
      device (timm's Swin ``attn_mask``) is born on meta;
    * it gets a ``device="meta"`` argument (timm's ``create_model(..., device="meta")`` passes it
      down to every module).

    It never records a class with a ``__new__`` of its own (see ``constructs_through_hook``).
    What it keeps is the raw call (class, arguments, default dtype, the argument objects'
    attributes): a Recipe is made of it only if a buffer ever needs it.  Whatever goes wrong in
    here is logged, never raised: construction must not break.
    """
    global _leaf_classes
    _leaf_classes = frozenset(unrecorded_classes)
    new = object.__new__
    stack_length, thread_ident = compat.function_mode_stack_length, threading.get_ident
    module_attributes = nn.Module.__dict__  # register_parameter: replaced by accelerate's init_empty_weights()
    original_register_parameter = _ORIGINAL_REGISTER_PARAMETER
    thread, default_dtype, new_reference = recipes.thread_state, torch.get_default_dtype, weakref.ref
    argument_states, plain_types = recipes.argument_states, recipes.plain_argument_types
    recorded = _recorded

    def recording_new(cls: type[nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
        global _parent_index
        module = new(cls)
        if cls not in hooked_classes and not constructs_through_hook(cls):  # emptied when switched off
            return module
        try:
            length = stack_length()  # meta_is_default_device(), inlined: this is the hot path
            if length:
                last = _last_mode_stack  # read once: another thread may replace it
                if length == last[0] and device_contexts_made == last[1] and thread_ident() == last[2]:
                    meta = last[3]
                else:
                    meta = _meta_on_mode_stack(length)
            else:
                meta = False
            if kwargs and "device" in kwargs and is_meta_device(kwargs["device"]):
                kwargs = dict(kwargs, device=None)  # replays run on CPU: the normal build is the call without it
            elif not (meta or (module_attributes["register_parameter"] is not original_register_parameter
                               and parameters_put_on_meta())):
                return module
            if recipes.replays_running and thread.replaying:
                return module
            # values only (RMSNorm(4096, eps=1e-5)): no argument object to keep
            states: tuple[Any, ...] | str | None = ()
            for value in args:
                if type(value) not in plain_types:
                    states = None
                    break
            if kwargs and states is not None:
                for value in kwargs.values():
                    if type(value) not in plain_types:
                        states = None
                        break
            if states is None:
                states = argument_states(args, kwargs)
                if type(states) is str:  # refused: keep no arguments, they may hold the model itself alive
                    args, kwargs = (), {}
            # An empty kwargs dict is let go (None): one object fewer kept per record for the GC to count.
            recorded[id(module)] = (new_reference(module), cls, args, kwargs or None, default_dtype(), states)
            _parent_index = None  # the module tree changed
            if len(recorded) > _prune_at:
                _prune()
        except Exception:
            logger.exception("bufferfix: could not record the construction of %s", cls.__qualname__)
        return module

    hooked_classes: set[type] = set()  # classes seen to construct through recording_new while switched on

    def constructs_through_hook(cls: type) -> bool:
        """Is the switch on, and does ``cls(...)`` reach this hook with its own arguments?  Not for
        a class with a ``__new__`` of its own: it calls ``super().__new__(cls)`` without them
        (object.__new__ takes none), and replaying the call as recorded would give the defaults'
        buffers."""
        if not switch.active:
            hooked_classes.clear()  # (also done by the switch: see TorchNN._uninstrument)
            return False
        through = cls not in unrecorded_classes and getattr(cls, "__new__", None) is recording_new
        if through and len(hooked_classes) < 10000:  # classes made on the fly: do not keep them all
            hooked_classes.add(cls)
        return through

    hook = cast(ConstructorHook, recording_new)  # a plain function (the fastest __new__), marked:
    hook.bufferfix_hook = "recording_new"  # recognised after importlib.reload, see torch_nn
    hook.hooked_classes = hooked_classes
    return hook


def meta_is_default_device() -> bool:
    """Is ``meta`` the default device of this thread (``with torch.device("meta")``, set_default_device)?

    Asked for every module constructed, so the answer is kept for as long as this thread's
    torch-function mode stack keeps its length and no device context was made since (each
    ``with torch.device(...)`` makes one: :func:`device_context_made`); then the stack is walked."""
    length = compat.function_mode_stack_length()
    if not length:
        return False
    last = _last_mode_stack  # read once: another thread may replace it
    if length == last[0] and device_contexts_made == last[1] and threading.get_ident() == last[2]:
        return last[3]
    return _meta_on_mode_stack(length)


def _meta_on_mode_stack(length: int) -> bool:
    global _last_mode_stack
    made = device_contexts_made  # read first: a context made while walking makes the answer stale
    context = compat.device_context()
    meta = context is not None and torch.device(context.device).type == "meta"
    _last_mode_stack = (length, made, threading.get_ident(), meta)
    return meta


def device_context_made() -> None:
    """A ``DeviceContext`` was made (``with torch.device(...)``, ``set_default_device``, or the
    integration was switched on): what :func:`meta_is_default_device` kept may be stale."""
    global device_contexts_made
    device_contexts_made = next(_numbers)  # next() is atomic: two threads never write the same number


_numbers = itertools.count(1)
device_contexts_made = 0
# (stack length, device contexts made, thread, is meta the default device?)
_last_mode_stack: tuple[int, int, int | None, bool] = (0, 0, None, False)
_ORIGINAL_REGISTER_PARAMETER = nn.Module.register_parameter
_last_register_parameter: tuple[object, bool] = (_ORIGINAL_REGISTER_PARAMETER, False)


def parameters_put_on_meta() -> bool:
    """Has ``nn.Module.register_parameter`` been replaced by a function that puts parameters on
    meta?  accelerate's replacement holds the target device in its closure; the function is
    looked at once, then only compared by identity."""
    global _last_register_parameter
    current = nn.Module.__dict__.get("register_parameter")
    if current is _last_register_parameter[0]:
        return _last_register_parameter[1]
    on_meta, function = False, current
    while function is not None and not on_meta:  # through the ones replays put in front (recipes)
        for cell in getattr(function, "__closure__", None) or ():
            try:
                on_meta = on_meta or is_meta_device(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        function = getattr(function, "bufferfix_displaced", None)
    _last_register_parameter = (current, on_meta)
    return on_meta


def is_meta_device(value: Any) -> bool:  # a device= argument: whatever the caller passed
    """``"meta"`` or ``torch.device("meta")``, as a ``device=`` argument is given."""
    kind = type(value)
    if kind is str:
        return value == "meta"
    return kind is torch.device and value.type == "meta"


def torch_nn_own_classes() -> frozenset[type[nn.Module]]:
    """torch.nn's own module classes (Linear, Embedding, LayerNorm, SiLU, ...), containers aside.

    None of their constructors makes a non-persistent buffer or a plain tensor attribute
    (tests/test_hygiene.py reads their sources to check), so their constructions are not
    recorded: they are most of the modules of a model, and a buffer that a parent module puts
    on one of them is recovered by replaying the parent.  Sequential / ModuleList / ModuleDict
    are still recorded: the parent index walks down from recorded modules, and a container is
    often the top of a model (``nn.Sequential(...)``) or between a model and its layers.
    """
    found: set[type[nn.Module]] = set()
    pending = [nn.Module]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return frozenset(cls for cls in found
                     if cls.__module__.startswith("torch.nn.modules.") and not issubclass(cls, containers))


def keep_c_constructor(leaf_classes: Collection[type[nn.Module]]) -> None:
    """Give torch.nn's leaf classes C's ``object.__new__`` in their own class dict, before
    ``nn.Module.__new__`` is set: CPython then keeps their C constructor slot, and does not
    route them through the Python hook (562 of a 70B Llama's 1047 constructions).

    Only while ``nn.Module`` has no ``__new__`` of its own yet: once it has, a leaf's slot is
    the Python one already, and ``object.__new__`` put in front of it would reject the
    constructor's arguments."""
    for cls in leaf_classes:
        if "__new__" not in cls.__dict__:
            cls.__new__ = object.__new__  # type: ignore[method-assign]  # patching torch's classes
    signatures.keep_signatures(leaf_classes, is_constructor_hook)  # inspect.signature as if these __new__s were not there


def hook_subclasses_of(leaf_classes: Collection[type[nn.Module]], hook: object) -> None:
    """Classes made from a leaf class outside torch.nn (``class MyNorm(nn.LayerNorm)``, which may
    register a buffer) inherit the leaf's C constructor: give them the recording hook.  Classes
    made later get it from ``nn.Module.__init_subclass__`` (the torch_nn integration).  A hook
    from before an ``importlib.reload`` is replaced by this one."""
    pending, seen = list(leaf_classes), set(leaf_classes)
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass in seen:
                continue
            seen.add(subclass)
            pending.append(subclass)
            if inherits_c_constructor(subclass) or is_constructor_hook(subclass.__dict__.get("__new__")):
                subclass.__new__ = hook  # type: ignore[method-assign, assignment]  # the hook, as nn.Module's


def inherits_c_constructor(cls: type) -> bool:
    """Does ``cls`` construct through a leaf class's ``object.__new__`` (no ``__new__`` of its own)?"""
    return "__new__" not in cls.__dict__ and cls.__new__ is object.__new__


_own_new: dict[type, bool] = {}  # class -> has it a __new__ of its own (never recorded)?
_plain_classes: set[type] = set()  # the classes in _own_new without one: module_registered's common case
_leaf_classes: frozenset[type] = frozenset()  # the constructor hook's unrecorded classes (torch.nn's own)


def unrecordable(cls: type) -> bool:
    """Is ``cls`` a class whose constructions are never recorded, because it has a ``__new__`` of
    its own (see ``constructs_through_hook``)?  Planning looks at such modules' containers anyway:
    a tensor on meta there must be named."""
    verdict = _own_new.get(cls)
    if verdict is None:
        new = cls.__new__
        verdict = not (new is object.__new__ or is_constructor_hook(new))
        if len(_own_new) < 10000:
            _own_new[cls] = verdict
            if not verdict:
                _plain_classes.add(cls)
    return verdict


def is_constructor_hook(candidate: object) -> bool:
    """Is this (a staticmethod of) a :func:`constructor_hook`, maybe from before a reload?"""
    return getattr(getattr(candidate, "__func__", candidate), "bufferfix_hook", None) == "recording_new"


# --------------------------------------------------------------------------- who put a meta buffer there

_registered = compat.WeakIdKeyDictionary()  # meta tensor -> weakref to the module whose constructor set it, or None


def buffer_registered(module: nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """A global buffer-registration hook (``register_buffer`` and ``module.name = tensor`` alike):
    notes who put a meta tensor into a buffer slot, so that a replay is used only where it gives the
    tensor as the constructor left it.

    * inside an ``nn.Module`` constructor: that module (a parent's constructor may set a buffer on
      its child after the child's returned: only the parent's replay has it);
    * inside ``Module._apply`` (``.to(dtype)`` of a module whose ``_apply`` reassigns its buffers):
      the same value converted, so what was noted of the one it replaces;
    * anywhere else: user code set it after construction, which no replay can give.

    Only meta tensors, and real ones in a module built with its parameters on meta
    (``init_empty_weights()``: a real value its constructor drew at random is not a normal build's,
    one that user code put there is; recorded, or of a class never recorded) are looked at; returns
    None (the tensor is kept)."""
    if tensor is None or (recipes.replays_running and recipes.thread_state.replaying):
        return None
    if not tensor.is_meta and not was_recorded(module) and not (unrecordable(type(module)) and parameters_put_on_meta()):
        return None  # (a module of a class never recorded is built with parameters on meta like its parent)
    try:
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None:
            code_name = frame.f_code.co_name
            if code_name == "__init__" or code_name == "_apply":
                owner = frame.f_locals.get("self")
                if isinstance(owner, nn.Module):
                    if code_name == "_apply":
                        previous = module._buffers.get(name)
                        if previous is not None and previous in _registered:
                            _registered[tensor] = _registered[previous]
                    else:
                        _registered[tensor] = weakref.ref(owner)
                    return None
            frame = frame.f_back
        _registered[tensor] = None
    except Exception:
        logger.exception("bufferfix: could not note the registration of %s", name)
    return None


def set_outside_construction(tensor: torch.Tensor) -> bool:
    """Was the tensor put into its buffer slot by code outside any constructor?"""
    return tensor in _registered and _registered[tensor] is None


def constructed_by(tensor: torch.Tensor) -> nn.Module | None:
    """The module whose constructor put the meta tensor into its buffer slot, if known and alive."""
    owner = _registered.get(tensor)
    return owner() if owner is not None else None


def set_in_construction(tensor: torch.Tensor) -> bool:
    """Was the tensor put into its buffer slot by a constructor, alive or not (the module a
    ``copy.deepcopy`` was made of)?"""
    return _registered.get(tensor) is not None


def follow_tensor_copy(original: torch.Tensor, copy: torch.Tensor) -> None:
    """``copy.deepcopy`` of a meta tensor keeps what was noted of it."""
    if original in _registered:
        _registered[copy] = _registered[original]


def follow_tensor(original: torch.Tensor, copy: torch.Tensor) -> None:
    """``copy`` stands for the meta tensor ``original`` from now on (its ``copy.deepcopy``, or what
    ``Module._apply`` converted it into on meta: a dtype cast): it keeps what was noted of
    ``original``: who put it in its slot, the in-place writes it had seen, its snapshot."""
    follow_tensor_copy(original, copy)
    recipes.follow_tensor_copy(original, copy)
    snapshots.follow_copy(original, copy)


# Plain tensor attributes that ``Module._apply`` may see converted, by a module's own ``_apply``:
# (the module, [(attribute, tensor before)]), until :func:`follow_moved_attributes` ties each to
# what it was converted into.
_moving: list[tuple[weakref.ref[nn.Module], list[tuple[str, torch.Tensor]]]] = []


def moving_attributes(root: nn.Module, own_apply: bool) -> None:
    """``Module._apply`` is about to run for ``root`` (``.to(torch.bfloat16)``, ``.half()``, ``to_empty``):
    note the plain tensor attributes that a module's own ``_apply`` may convert (``self.table =
    fn(self.table)`` after ``super()._apply(fn)``; see :func:`follow_moved_attributes`): those below
    ``root`` that still hold what their constructor left, and if ``root``'s class has an ``_apply``
    of its own, all of ``root``'s.  (The function a submodule's own ``_apply`` is given already ties
    what it converts on meta: the torch_nn integration wraps it.)"""
    if own_apply:
        attributes = [(name, value) for name, value in vars(root).items()
                      if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)]
        if attributes:
            _moving.append((weakref.ref(root), attributes))
    if not _left:
        return
    for module in root.modules():
        noted = _left.get(module)
        if noted is None or (own_apply and module is root):
            continue
        held = vars(module)
        attributes = [(name, value) for name, (value, _) in noted.items()
                      if held.get(name) is value and isinstance(value, torch.Tensor)]
        if attributes:
            _moving.append((weakref.ref(module), attributes))


def follow_moved_attributes() -> None:
    """Each attribute noted by :func:`moving_attributes` that now holds another tensor of its
    shape, on meta as before or off meta as before (its ``_apply`` converted it: ``.to(torch.bfloat16)``,
    ``.half()``), stands for the one before: it keeps what was noted of it (:func:`follow_tensor`),
    and is the constructor's if that one was (:func:`left_by_constructor`).  A meta tensor that
    became a real one (``to_empty``) is not the constructor's: recovery gives it a value."""
    while _moving:
        module_ref, attributes = _moving.pop()
        module = module_ref()
        if module is None:
            continue
        noted = _left.get(module)
        for name, before in attributes:
            now = vars(module).get(name)
            if (not isinstance(now, torch.Tensor) or now is before or now.is_meta != before.is_meta
                    or now.shape != before.shape):
                continue
            if now.is_meta:
                follow_tensor(before, now)
            if noted is not None and name in noted and noted[name][0] is before:
                noted[name] = (now, None)

# --------------------------------------------------------------------------- what a constructor left

# module -> {attribute: (value, a copy of its entries if a list or dict)}, as the module held them when
# its constructor returned (first registered into a parent): see module_registered.
_left = compat.WeakIdKeyDictionary()
_unrecorded_parents = compat.WeakIdKeyDictionary()  # module of a class never recorded, holding modules -> True
UNKNOWN = object()  # what left_by_constructor gives where no note says


def module_registered(parent: nn.Module, name: str, child: nn.Module | None) -> None:
    """A global module-registration hook: a module built on meta (recorded, or of a class never
    recorded) or by a replay, registered into a parent, has returned from its constructor, so the
    tensors it holds now in plain attributes and in list, tuple and dict attributes are the ones
    its constructor left (see :func:`left_by_constructor`).  Only its first registration counts (a
    parent may change it after).  Returns None (the module is kept).

    It runs for every module registered into another, in every build (a 70B model: a thousand
    times), so the common cases take a few lookups done in C: a module of torch.nn's own classes;
    one laid out as the last module of its class that held no tensor, holding none either
    (:data:`_quiet`).  benchmarks/README.md gives what it costs."""
    if type(parent) in _plain_classes:
        kind = type(child)
        if kind in _leaf_classes:
            return None  # torch.nn's own classes: never recorded, and no constructor of theirs leaves a tensor
        quiet = _quiet.get(kind)
        if quiet is not None:
            attributes = child.__dict__
            if len(attributes) == quiet[0]:
                try:
                    for value in quiet[1](attributes):
                        if type(value) not in _SKIPPED_TYPES:
                            break
                    else:
                        if quiet[2] is None or _hold_no_tensor(attributes, quiet[2]):
                            return None  # nothing that holds a tensor: nothing to note (most modules)
                except (KeyError, TypeError):  # an attribute another than its class's last one had
                    pass
    try:
        _module_registered(parent, child)
    except Exception:
        logger.exception("bufferfix: could not note the tensors of %s", type(child).__qualname__)
    return None


def _module_registered(parent: nn.Module, child: nn.Module | None) -> None:
    """:func:`module_registered` beyond its common cases."""
    if child is None:
        return
    child_unrecordable = unrecordable(type(child))  # both known from now on: the common cases need it
    parent_unrecordable = unrecordable(type(parent))
    anything_recorded = bool(_recorded or recipes.replays_running)
    if anything_recorded and parent_unrecordable and parent not in _unrecorded_parents:
        _note_unrecorded_parent(parent)
    entry = _recorded.get(id(child))
    # A module built on meta, of a class never recorded, or by a replay: what it holds is noted.
    # Any other is looked at all the same: if it holds no tensor, the next of its class takes the
    # common case.
    noting = anything_recorded and ((entry is not None and entry[0]() is child) or child_unrecordable
                            or (recipes.replays_running and recipes.thread_state.replaying))
    attributes = vars(child)
    noted: dict[str, tuple[Any, list[Any] | dict[Any, Any] | None]] = {}
    plain: list[str] = []
    containers: Containers = ()
    kinds = _note_kinds
    for attribute, value in attributes.items():
        if attribute in MODULE_STATE:
            continue
        kind = kinds.get(type(value))
        if kind is None:
            kind = _note_kind(type(value))
        if kind == _SKIP:
            plain.append(attribute)
            continue
        entries = value.values() if kind == _DICT else value
        # A container holding no tensor needs no note: a tensor found there later is one the
        # constructor did not leave, and its replay says so (it has none there).
        if kind == _TENSOR:
            noted[attribute] = (value, None)
        elif not _may_hold_tensors(entries):
            containers += ((attribute, _ENTRIES[kind]),)
        else:
            noted[attribute] = (value, list(value) if kind == _LIST else dict(value) if kind == _DICT else None)
    # Nothing noted: nothing is kept, and a tensor found there later is not known to be another
    # than the constructor's (an ancestor's replay may have it).
    if noted:
        if noting and child not in _left:
            _left[child] = noted
    elif not child_unrecordable:
        _learn_quiet(type(child), attributes, plain, containers)


_SKIP, _TENSOR, _TUPLE, _LIST, _DICT = range(5)  # what module_registered keeps of an attribute, by its type
_ENTRIES: dict[int, Callable[[Any], Iterable[Any]]] = {_TUPLE: tuple.__iter__, _LIST: list.__iter__,
                                                       _DICT: dict.values}  # raise TypeError for another kind
_note_kinds: dict[type, int] = {}
_SKIPPED_TYPES: set[type] = set()  # the types classified _SKIP: a module holding only these notes nothing
Containers = tuple[tuple[str, Callable[[Any], Iterable[Any]]], ...]  # (attribute, a function giving its entries)
# class -> (len(vars(instance)), a getter of the values of its attributes that held no container,
# (attribute, a function giving its entries) for those that held one, or None), as the last instance
# of the class that held no tensor had them: module_registered's common case
_quiet: dict[type, tuple[int, Callable[[dict[str, Any]], tuple[Any, ...]], Containers | None]] = {}


def _learn_quiet(cls: type, attributes: dict[str, Any], plain: list[str], containers: Containers) -> None:
    """An instance of ``cls`` holding no tensor, laid out as ``attributes``: the next one laid out
    the same, holding no tensor either, takes module_registered's common case."""
    if len(_quiet) < 10000:  # classes made on the fly: do not keep them all
        # "training" twice: two names at least, so that the getter gives a tuple
        _quiet[cls] = (len(attributes), operator.itemgetter("training", "training", *plain), containers or None)


def _hold_no_tensor(attributes: dict[str, Any], containers: Containers) -> bool:
    """Do these container attributes hold nothing that may be a tensor, as when noted?"""
    for name, entries in containers:
        if not _SKIPPED_TYPES.issuperset(map(type, entries(attributes[name]))):
            return False
    return True


def _may_hold_tensors(values: Iterable[Any]) -> bool:
    """Does a container hold a tensor, or a value that may hold one (a nested container)?"""
    types = set(map(type, values))
    return not _SKIPPED_TYPES.issuperset(types) and any(_note_kind(kind) != _SKIP for kind in types - _SKIPPED_TYPES)


def _note_kind(kind: type) -> int:
    found = (_TENSOR if issubclass(kind, torch.Tensor) else _TUPLE if issubclass(kind, tuple)
             else _LIST if issubclass(kind, list) else _DICT if issubclass(kind, dict) else _SKIP)
    if len(_note_kinds) < 10000:  # classes made on the fly: do not keep them all
        _note_kinds[kind] = found
        if found == _SKIP:
            _SKIPPED_TYPES.add(kind)
    return found


def _note_unrecorded_parent(parent: nn.Module) -> None:
    """A module of a class never recorded holds modules: the module tree (:func:`owners`) starts
    from it too, so that what is below it is named by its path from it."""
    global _parent_index
    _unrecorded_parents[parent] = True
    _parent_index = None


def left_by_constructor(module: nn.Module, name: str, steps: tuple[tuple[str, Any], ...]) -> Any:
    """The tensor ``module.<name><steps>`` held when the module's constructor returned, or
    :data:`UNKNOWN` (a module never registered into a parent, such as a model's root, or a place
    inside an object the note does not copy)."""
    noted = _left.get(module)
    if noted is None:
        return UNKNOWN
    value, entries = noted.get(name, (None, None))
    for index, (kind, key) in enumerate(steps):
        if index == 0 and entries is not None:  # a list or dict, as its entries were then
            value = entries.get(key) if isinstance(entries, dict) else entries[key] if key < len(entries) else None
        elif kind == "item" and isinstance(value, tuple):  # its entries cannot have changed
            value = value[key] if key < len(value) else None
        else:
            return UNKNOWN  # inside a container or object the note holds no copy of
    return value


# --------------------------------------------------------------------------- the side table

def _prune() -> None:
    """Entries are not removed when their module dies (a weakref callback per module costs more
    than the whole record): sweep the dead ones whenever the table has doubled."""
    global _prune_at
    for key, entry in list(_recorded.items()):
        if entry[0]() is None:
            del _recorded[key]
    for key, (module_ref, _) in list(_awaiting.items()):
        if module_ref() is None:
            del _awaiting[key]
    _prune_at = max(_PRUNE_AT_LEAST, 2 * len(_recorded))


def was_recorded(module: nn.Module) -> bool:
    """Was ``module`` built on meta (and not yet materialised)?  Cheaper than :func:`recipe_of`,
    which makes and interns the Recipe."""
    entry = _recorded.get(id(module))
    return entry is not None and entry[0]() is module


def recipe_of(module: nn.Module) -> recipes.Recipe | None:
    """The module's Recipe if it was built on meta (made from the raw record on first use)."""
    entry = _recorded.get(id(module))
    if entry is None or entry[0]() is not module:
        return None
    if len(entry) == 2:
        return entry[1]
    _, cls, args, kwargs, default_dtype, states = entry
    recipe = recipes.intern(cls, args, kwargs if kwargs is not None else {}, default_dtype, states)
    _recorded[id(module)] = (entry[0], recipe)
    return recipe


def has_any() -> bool:
    return bool(_recorded)


def live_records() -> int:
    """How many live modules have a record (dead entries are swept first)."""
    _prune()
    return len(_recorded)


def replay_nbytes() -> int:
    """Bytes of the tensors in the replays cached on live recipes."""
    seen: set[int] = set()
    total = 0
    for entry in [entry[1] for entry in list(_recorded.values()) if len(entry) == 2]:
        for slot in ("_replayed", "_replayed_real"):
            cached = getattr(entry, slot, None)
            for module in (cached.module, *cached.others) if isinstance(cached, recipes.Replayed) else ():
                if id(module) not in seen:
                    seen.add(id(module))
                    total += sum(t.untyped_storage().nbytes() for t in module.buffers() if not t.is_meta)
    return total


def follow_copy(original: nn.Module, copy: nn.Module, memo: dict[int, Any]) -> None:
    """``copy.deepcopy`` of a meta-built module keeps its recipe, and the note of what its
    constructor left (each object as ``memo`` says it was copied)."""
    global _parent_index
    entry = _recorded.get(id(original))
    if entry is not None and entry[0]() is original:
        _recorded[id(copy)] = (weakref.ref(copy), *entry[1:])
        _parent_index = None
    noted = _left.get(original)
    if noted is not None and copy not in _left:
        def copied(value: Any) -> Any:
            return memo.get(id(value), value)

        _left[copy] = {name: (copied(value), None if entries is None
                              else {key: copied(item) for key, item in entries.items()} if isinstance(entries, dict)
                              else [copied(item) for item in entries])
                       for name, (value, entries) in noted.items()}


# --------------------------------------------------------------------------- the module tree

def owners(module: nn.Module, name: str) -> Iterator[tuple[nn.Module, str]]:
    """``(module, name)``, then each ancestor with the name relative to it."""
    yield module, name
    seen = {id(module)}
    while True:
        parent = _parent_of(module)
        if parent is None or id(parent[0]) in seen:
            return
        module, name = parent[0], parent[1] + "." + name
        seen.add(id(module))
        yield module, name


def ancestors(module: nn.Module) -> Iterator[nn.Module]:
    for owner, _ in owners(module, ""):
        if owner is not module:
            yield owner


def _parent_of(module: nn.Module) -> tuple[nn.Module, str] | None:
    """``(parent, attribute)`` if ``module`` is a child of a module built on meta (or of a container
    in one, or of a module of a class never recorded), else None.

    Asked only when a module's own recipe is not enough or a module is materialised alone, so
    the child -> parent index is built then, over every recorded module, and kept until the next
    module is recorded (FSDP1 materialises a thousand modules one by one: one index for all).
    """
    global _parent_index
    index = _parent_index
    if index is None:
        # Every module reachable from a recorded one: torch.nn's leaf classes are not recorded.
        index = {}
        visited: set[int] = set()
        pending = [entry[0]() for entry in list(_recorded.values())] + list(_unrecorded_parents.keys())
        while pending:
            parent = pending.pop()
            if parent is None or id(parent) in visited:
                continue
            visited.add(id(parent))
            parent_ref = weakref.ref(parent)
            children = vars(parent).get("_modules")  # none yet: its constructor is running in another thread
            for attribute, child in (children or {}).items():
                if child is not None:
                    index[id(child)] = (parent_ref, attribute)
                    pending.append(child)
        _parent_index = index
    entry = index.get(id(module))
    if entry is None:
        return None
    parent = entry[0]()
    # The tree may have changed since (a child replaced, a wrapper inserted): only a live link counts.
    if parent is None or parent._modules.get(entry[1]) is not module:
        return None
    return parent, entry[1]


def recorded_path(module: nn.Module) -> str:
    """The dotted path of ``module`` below its outermost ancestor built on meta ('' if none):
    names modules in messages when they are materialised one by one (FSDP1's param_init_fn)."""
    names = []
    for _, relative in owners(module, ""):
        names = relative.rstrip(".").split(".") if relative.rstrip(".") else []
    return ".".join(names)


# --------------------------------------------------------------------------- lifetimes

def forget(module: nn.Module) -> None:
    """A materialised module no longer needs its recipe (lets the replay cache go).  The parent
    index keeps its weak link: modules materialised one by one after it still need the chain to
    name themselves."""
    # An entry under a live module's id is its own, or a dead module's whose id was reused: both go.
    _recorded.pop(id(module), None)
    if _left:
        _left.pop(module, None)


def forget_all(modules: Iterable[nn.Module]) -> None:
    if _recorded:
        for module in modules:
            _recorded.pop(id(module), None)
    if _left:
        for module in modules:
            _left.pop(module, None)


def holds_meta_tensors(module: nn.Module) -> bool:
    """Does ``module`` hold a parameter, buffer or plain tensor attribute on meta?"""
    return any(isinstance(tensor, torch.Tensor) and tensor.is_meta
               for tensor in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()))


def forget_when_subtree_done(module: nn.Module, was_meta: bool) -> None:
    """``module`` was materialised on its own (``to_empty(recurse=False)``): forget its record once
    no descendant still on meta may need it, and count it off its waiting ancestors."""
    waiting = sum(1 for sub in module.modules() if sub is not module and holds_meta_tensors(sub))
    if waiting:
        _awaiting[id(module)] = [weakref.ref(module), waiting]
    else:
        forget(module)
    if not was_meta or not _awaiting:
        return
    for ancestor in ancestors(module):
        entry = _awaiting.get(id(ancestor))
        if entry is not None and entry[0]() is ancestor:
            entry[1] -= 1
            if entry[1] <= 0:
                del _awaiting[id(ancestor)]
                forget(ancestor)


def awaiting_count() -> int:
    return sum(1 for module_ref, _ in _awaiting.values() if module_ref() is not None)
