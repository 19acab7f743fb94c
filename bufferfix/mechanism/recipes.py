"""Recompute: remember how meta-built modules were constructed, and re-run that on CPU.

A buffer created while ``meta`` is the default device never held a value, so
there is nothing to snapshot.  What we can keep is the constructor call that
produced it: the class, the arguments, and the default dtype at the time.  At
materialisation the constructor is re-run ("replayed") on CPU with its
parameters sent straight to meta (so no weight memory is touched), and the
non-persistent buffers are taken from the replayed module.

Recipes live in a side table keyed weakly by module, never on the module, so
pickling / ``torch.save`` / ``state_dict`` see nothing.  Identical recipes are
interned (80 identical decoder layers share one recipe) and the replay result is
cached on the recipe, so it is computed once and freed together with the recipe
once every module that used it has been materialised.
"""
import contextlib
import copy
import functools
import operator
import random
import sys
import threading
import types
import weakref

import torch
from torch import nn
from torch.utils._device import DeviceContext
from torch.utils.weak import WeakIdKeyDictionary

class _ThreadState(threading.local):
    replaying = False  # a class default: a missing thread-local attribute costs an exception


_local = _ThreadState()

# Every module constructed while meta is the default device (thousands for a 70B model) is
# recorded, so recording must cost next to nothing: the raw call is kept, and turned into a
# Recipe (interned, comparable) only if one of its buffers ever needs recomputing.
_recorded = {}  # id(module) -> (weakref to the module, Recipe or raw construction tuple)
_PRUNE_AT_LEAST = 4096
_prune_at = _PRUNE_AT_LEAST
_parent_index = None  # id(child) -> (weakref to parent, attribute), built when first asked for
_version_offsets = WeakIdKeyDictionary()  # deep-copied meta tensor -> writes its original had seen
_interned = weakref.WeakValueDictionary()  # recipe key -> Recipe
_recompute_functions = {}  # class -> fn(module) -> {name: tensor}
_never_replay = set()  # classes whose constructors must not be re-run


class ReplayError(Exception):
    """The recipe cannot produce the value a normal build would have; the message says why."""


class Recipe:
    __slots__ = ("cls", "args", "kwargs", "default_dtype", "argument_states", "refusal", "_replayed",
                 "_replayed_on_meta", "__weakref__")

    def __init__(self, cls, args, kwargs, default_dtype, argument_states=(), refusal=None):
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.default_dtype = default_dtype
        # Arguments are kept by reference, so a config object changed after construction
        # would replay with its new values: each argument object's attributes as they were
        # at construction (a shallow copy of its __dict__; compared by identity, never ==).
        self.argument_states = argument_states
        self.refusal = refusal  # why this constructor must not be re-run, or None
        self._replayed = None  # (module, randomised buffer names) or ReplayError
        self._replayed_on_meta = None  # a meta build, only to read version counters

    def describe(self):
        return "%s.%s(...)" % (self.cls.__module__, self.cls.__qualname__)

    def has_argument_states(self, states):
        """Were the arguments, attribute by attribute, the same objects as in ``states``?"""
        return len(states) == len(self.argument_states) and all(
            value is other and _same_attributes(state, other_state)
            for (value, state), (other, other_state) in zip(self.argument_states, states))

    def arguments_as_recorded(self):
        """``(args, kwargs)`` with every argument object that changed since construction replaced
        by a shallow copy holding its attributes as they were then."""
        restored = {}
        for value, state in self.argument_states:
            if not _same_attributes(_state_of(value), state):
                duplicate = copy.copy(value)
                vars(duplicate).clear()
                vars(duplicate).update(state)
                restored[id(value)] = duplicate
        args = tuple(restored.get(id(value), value) for value in self.args)
        kwargs = {name: restored.get(id(value), value) for name, value in self.kwargs.items()}
        return args, kwargs


# Recording runs for every module built on meta (thousands for a 70B model), so the helpers below
# look at type(value) and use object.__getattribute__: a failed isinstance() or a plain attribute
# read goes through the argument's own __getattribute__, which transformers' configs override.
_STATELESS = (type, types.FunctionType, types.BuiltinFunctionType, types.ModuleType, types.MethodType,
              functools.partial)


def _state_of(value):
    """The argument object's attribute dict, or None for values and callables."""
    if type(value) in _VALUE_TYPE_SET or issubclass(type(value), _STATELESS):
        return None
    try:
        state = object.__getattribute__(value, "__dict__")
    except AttributeError:
        return None
    return state if type(state) is dict else None


def _same_attributes(current, recorded):
    """Identity, never ==: as many attributes, in the same order, each holding the very same object
    (names are not compared: a rename that keeps every value object in place is not a real edit)."""
    return len(current) == len(recorded) and all(map(operator.is_, current.values(), recorded.values()))


# --------------------------------------------------------------------------- recording

def replaying():
    return _local.replaying


def meta_is_default_device():
    """Is ``meta`` the default device (``with torch.device("meta")``, set_default_device)?

    Asked for every module constructed, so it walks the mode stack in place instead of
    building it as a list (what torch.get_default_device() does, plus a tensor allocation).
    """
    global _last_device_context
    context = _device_context()
    if context is None:
        return False
    if context is not _last_device_context[0]:  # device.type builds a string: ask once per context
        _last_device_context = (context, torch.device(context.device).type == "meta")
    return _last_device_context[1]


def _device_context():
    """The DeviceContext that sets the default device, or None (the default device is CPU)."""
    for index in range(_function_mode_stack_length() - 1, -1, -1):
        mode = _function_mode_at(index)
        if isinstance(mode, DeviceContext):
            return mode
    return vars(torch._GLOBAL_DEVICE_CONTEXT).get("device_context")  # getattr's default raises inside


_last_device_context = (None, False)
_function_mode_stack_length = torch._C._len_torch_function_stack
_function_mode_at = torch._C._get_function_stack_at


_VALUE_TYPE_SET = frozenset((int, float, complex, str, bytes, bool, type(None), torch.dtype, torch.device))


def _recipe_key_part(value):
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


def _refusal(value):
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


def _argument_states(args, kwargs):
    """``((argument, copy of its attributes), ...)`` for argument objects (configs), or a refusal.

    Runs for every module recorded, hence the fast paths by exact type."""
    states = ()
    for value in (*args, *kwargs.values()) if kwargs else args:
        kind = type(value)
        if kind in _VALUE_TYPE_SET or issubclass(kind, _STATELESS):
            continue
        if issubclass(kind, (nn.Module, torch.Tensor, list, tuple, dict)):
            refusal = _refusal(value)
            if refusal is not None:
                return refusal
            continue
        state = _state_of(value)
        if state is not None:
            states += ((value, state.copy()),)
    return states


def torch_nn_own_classes():
    """torch.nn's own module classes (Linear, Embedding, LayerNorm, SiLU, ...), containers aside.

    None of their constructors makes a non-persistent buffer or a plain tensor attribute
    (tests/test_hygiene.py reads their sources to check), so their constructions are not
    recorded: they are most of the modules of a model, and a buffer that a parent module puts
    on one of them is recovered by replaying the parent.  Sequential / ModuleList / ModuleDict
    are still recorded: the parent index walks down from recorded modules, and a container is
    often the top of a model (``nn.Sequential(...)``) or between a model and its layers.
    """
    found, pending = set(), [nn.Module]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    return frozenset(cls for cls in found
                     if cls.__module__.startswith("torch.nn.modules.") and not issubclass(cls, containers))


def record_construction(module, cls, args, kwargs):
    """Called from ``nn.Module.__new__`` while meta is the default device: keep the raw call."""
    global _parent_index
    states = _argument_states(args, kwargs)
    if type(states) is str:  # refused: keep no arguments, they may hold the model itself alive
        args, kwargs = (), {}
    _recorded[id(module)] = (weakref.ref(module), (cls, args, kwargs, torch.get_default_dtype(), states))
    _parent_index = None  # the module tree changed
    if len(_recorded) > _prune_at:
        _prune()


def _prune():
    """Entries are not removed when their module dies (a weakref callback per module costs more
    than the whole record): sweep the dead ones whenever the table has doubled."""
    global _prune_at
    for key, (module_ref, _) in list(_recorded.items()):
        if module_ref() is None:
            del _recorded[key]
    _prune_at = max(_PRUNE_AT_LEAST, 2 * len(_recorded))


def recipe_of(module):
    """The module's Recipe if it was built on meta (made from the raw record on first use)."""
    entry = _recorded.get(id(module))
    if entry is None or entry[0]() is not module:
        return None
    recipe = entry[1]
    if type(recipe) is tuple:
        recipe = _intern(*recipe)
        _recorded[id(module)] = (entry[0], recipe)
    return recipe


def _intern(cls, args, kwargs, default_dtype, states):
    """One Recipe for identical constructor calls (80 decoder layers, one replay)."""
    if type(states) is str:
        return Recipe(cls, (), {}, default_dtype, refusal=states)
    # Plain values compare by value, argument objects by identity (held alive by the recipe).
    key = (cls, default_dtype, _recipe_key_part(args), _recipe_key_part(kwargs))
    recipe = _interned.get(key)
    if recipe is None or not recipe.has_argument_states(states):  # a config changed in between
        recipe = _interned[key] = Recipe(cls, args, kwargs, default_dtype, states)
    return recipe


def owners(module, name):
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


def ancestors(module):
    for owner, _ in owners(module, ""):
        if owner is not module:
            yield owner


def _parent_of(module):
    """``(parent, attribute)`` if ``module`` is a child of a module built on meta (or of a container
    in one), else None.

    Asked only when a module's own recipe is not enough or a module is materialised alone, so
    the child -> parent index is built then, over every recorded module, and kept until the next
    module is recorded (FSDP1 materialises a thousand modules one by one: one index for all).
    """
    global _parent_index
    index = _parent_index
    if index is None:
        # Every module reachable from a recorded one: torch.nn's leaf classes are not recorded.
        index, visited = {}, set()
        pending = [entry[0]() for entry in list(_recorded.values())]
        while pending:
            parent = pending.pop()
            if parent is None or id(parent) in visited:
                continue
            visited.add(id(parent))
            parent_ref = weakref.ref(parent)
            for attribute, child in parent._modules.items():
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


def recorded_path(module):
    """The dotted path of ``module`` below its outermost ancestor built on meta ('' if none):
    names modules in messages when they are materialised one by one (FSDP1's param_init_fn)."""
    names = []
    for _, relative in owners(module, ""):
        names = relative.rstrip(".").split(".") if relative.rstrip(".") else []
    return ".".join(names)


def forget(module):
    """A materialised module no longer needs its recipe (lets the replay cache go).  The parent
    index keeps its weak link: modules materialised one by one after it still need the chain to
    name themselves."""
    # An entry under a live module's id is its own, or a dead module's whose id was reused: both go.
    _recorded.pop(id(module), None)


def forget_all(modules):
    if _recorded:
        for module in modules:
            _recorded.pop(id(module), None)


def follow_copy(original, copy):
    """``copy.deepcopy`` of a meta-built module keeps its recipe."""
    global _parent_index
    entry = _recorded.get(id(original))
    if entry is not None and entry[0]() is original:
        _recorded[id(copy)] = (weakref.ref(copy), entry[1])
        _parent_index = None


def follow_tensor_copy(original, copy):
    """A deep copy starts with a fresh version counter; carry the writes the original had seen, so
    that "written in place after construction" stays detectable (see version_at_construction)."""
    offset = effective_version(original) - _raw_version(copy)
    if offset:
        _version_offsets[copy] = offset


def effective_version(tensor):
    return _raw_version(tensor) + _version_offsets.get(tensor, 0)


def _raw_version(tensor):
    try:
        return tensor._version
    except RuntimeError:  # inference tensors have no version counter
        return 0


def has_any():
    return bool(_recorded)


# --------------------------------------------------------------------------- user recipes

def register_recompute(cls, fn=None):
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


def never_replay(cls):
    """Never re-run ``cls``'s constructor (e.g. it has side effects); its buffers are then reported
    as unrecoverable unless a recompute function is registered."""
    _never_replay.add(cls)
    return cls


def registered_recompute(cls):
    for klass in cls.__mro__:
        fn = _recompute_functions.get(klass)
        if fn is not None:
            return fn
    return None


# --------------------------------------------------------------------------- replay

def parameters_to_meta(module, name, param):
    """Global parameter-registration hook: during a replay, parameters go straight to meta (only
    the buffers are wanted, so no weight memory is touched).  It stays installed: adding it per
    replay would mutate torch's hook dict while another thread iterates it."""
    if not _local.replaying or param is None or param.is_meta:  # every parameter registered goes through here
        return None
    if type(param) is nn.Parameter:
        return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
    try:  # Parameter subclasses keep their extra state, as accelerate's init_on_device does
        state = dict(param.__dict__, requires_grad=param.requires_grad)
        return type(param)(param.detach().to("meta"), **state)
    except Exception:
        return None


@contextlib.contextmanager
def _isolated(default_dtype, device="cpu"):
    """Run a constructor on ``device`` under ``default_dtype`` and leave no trace on global state."""
    previous = replaying()
    previous_dtype = torch.get_default_dtype()
    python_rng = random.getstate()
    numpy = sys.modules.get("numpy")
    numpy_rng = numpy.random.get_state() if numpy is not None else None
    _local.replaying = True
    # A device context sends every torch call through Python (~50 us per replay): skip it when
    # the default device is already the one wanted.
    context = _device_context()
    on_device = contextlib.nullcontext() if device == "cpu" and context is None else torch.device(device)
    try:
        with torch.random.fork_rng(devices=[]), on_device:
            torch.set_default_dtype(default_dtype)
            yield
    finally:
        torch.set_default_dtype(previous_dtype)
        random.setstate(python_rng)
        if numpy_rng is not None:
            numpy.random.set_state(numpy_rng)
        _local.replaying = previous


def _construct(recipe, seed):
    with _isolated(recipe.default_dtype):
        torch.default_generator.manual_seed(seed)  # torch.manual_seed goes through dynamo: ~0.2 ms
        before = torch.get_rng_state()
        args, kwargs = recipe.arguments_as_recorded()
        module = recipe.cls(*args, **kwargs)
        drew_random = not torch.equal(before, torch.get_rng_state())
    return module, drew_random


def version_at_construction(recipe, relative):
    """The version counter a tensor built by ``recipe`` has when its constructor returns *on meta*.

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
    sub_path, _, name = relative.rpartition(".")
    try:
        owner = recipe._replayed_on_meta.get_submodule(sub_path)
    except AttributeError:
        return None
    tensor = owner._buffers.get(name) if name in owner._buffers else vars(owner).get(name)
    return effective_version(tensor) if isinstance(tensor, torch.Tensor) else None


def _tensors_of(module):
    return {
        (path, name): tensor
        for path, sub in module.named_modules(remove_duplicate=False)
        for name, tensor in list(sub._buffers.items()) + list(vars(sub).items())
        if isinstance(tensor, torch.Tensor)
    }


def replay(recipe):
    """Return ``(module, randomised)``: a fresh CPU build, and the (path, name) of tensors that
    came from the random number generator.  Raises :class:`ReplayError`."""
    cached = recipe._replayed
    if cached is None:
        cached = recipe._replayed = _replay_uncached(recipe)
    if isinstance(cached, ReplayError):
        raise cached
    return cached


def _replay_uncached(recipe):
    if recipe.refusal:
        return ReplayError(recipe.refusal)
    if recipe.cls in _never_replay:
        return ReplayError("bufferfix.never_replay(%s) forbids re-running its constructor" % recipe.cls.__qualname__)
    try:
        module, drew_random = _construct(recipe, seed=0)
        randomised = set()
        if drew_random:
            # The constructor used the RNG; find out which tensors depend on it by building
            # again from another seed.  A normal build's random values are unknowable.
            again, _ = _construct(recipe, seed=1)
            first, second = _tensors_of(module), _tensors_of(again)
            randomised = {
                key for key, tensor in first.items()
                if key in second and not tensor.is_meta and not torch.equal(tensor, second[key])
            }
    except Exception as error:  # noqa: BLE001 - any failure of user code is reported, not raised
        return ReplayError("re-running %s raised %s: %s" % (recipe.describe(), type(error).__name__, error))
    return module, randomised
