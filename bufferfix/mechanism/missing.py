"""Buffers a constructor registers only when it is not on meta.

torchtune's ``Llama3ScaledRoPE`` calls ``rope_init()``, which returns early when the model is built
on meta: the meta model has no ``cache`` / ``theta`` buffers at all, so there is nothing to fill,
and forward raises "RoPE cache is not built" after loading (torchtune's recipes call
``m.rope_init()`` by hand after ``to_empty``).  For the classes an integration names
(:func:`expect_buffers`), the module's constructor is replayed on CPU like for any other buffer,
and every buffer the replay has and the live module lacks is registered on it exactly as the
normal build registers it (persistent or not, the replay's dtype, the materialisation's device),
together with the plain flags the same code set beside it (``is_cache_built``).
"""
import torch

from . import recipes, recording
from .sources import Attempt, Reason  # the Recovery values, as sources imports them

_predicates = []  # callables cls -> bool, from integrations
_verdicts = {}  # class -> does some predicate name it (cached: asked for every module planned)
_FLAGS = (bool, int, float, str, type(None))


def expect_buffers(predicate):
    """Modules whose class ``predicate(cls)`` accepts may lack, on meta, buffers their constructor
    registers elsewhere: add those after materialisation."""
    _predicates.append(predicate)
    _verdicts.clear()


def forget_expectation(predicate):
    if predicate in _predicates:
        _predicates.remove(predicate)
    _verdicts.clear()


def _expected(cls):
    verdict = _verdicts.get(cls)
    if verdict is None:
        verdict = _verdicts[cls] = any(_safe(predicate, cls) for predicate in _predicates)
    return verdict


def _safe(predicate, cls):
    try:
        return bool(predicate(cls))
    except Exception:  # noqa: BLE001 - an integration's predicate must not break planning
        return False


def candidates(modules):
    """The modules (each once) that may lack buffers and have a recorded constructor to tell."""
    if not _predicates:
        return []
    found = {}
    for module in modules:
        if _expected(type(module)) and id(module) not in found and recording.was_recorded(module):
            found[id(module)] = module
    return list(found.values())


def add(module, device):
    """Register on ``module`` the buffers its replay has and it lacks.  Returns ``(added names,
    attempt or None)``; the attempt says why nothing could be learnt."""
    recipe = recording.recipe_of(module)
    try:
        replayed, randomised = recipes.replay(recipe)
    except recipes.ReplayError as error:
        return [], Attempt(recipe.origin, error.reason, error.detail)
    added = []
    for name, value in replayed._buffers.items():
        if value is None or name in module._buffers or name in vars(module):
            continue
        if ("", name) in randomised:
            return added, Attempt(recipe.origin, Reason.RANDOM)
        persistent = name not in replayed._non_persistent_buffers_set
        target = value.to(device if device is not None else value.device, copy=True)
        module.register_buffer(name, target, persistent=persistent)
        added.append(name)
    if added:  # the flags the same code set beside them (torchtune: is_cache_built = True)
        for name, value in vars(replayed).items():
            if isinstance(value, _FLAGS) and not name.startswith("_") and vars(module).get(name, value) != value:
                module.__dict__[name] = value
    return added, None


def device_of(module):
    """Where the module's materialised tensors are (for a buffer added to a module that had none)."""
    for tensor in module.parameters():
        if not tensor.is_meta:
            return tensor.device
    for tensor in module.buffers():
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")
