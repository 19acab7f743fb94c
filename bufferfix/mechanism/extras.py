"""What a materialisation plan covers besides non-persistent buffers and plain tensor attributes.

* **Tensors in container attributes** (:mod:`.containers`): a list / dict of tensors on a module,
  or tensors inside a plain object it holds, still on meta after materialisation.
* **Buffers a constructor registers only off meta** (:mod:`.missing`): torchtune's ``rope_init()``.
* **Attributes derived from parameters**: the legacy ``torch.nn.utils.weight_norm`` keeps ``weight``
  as a plain tensor attribute that its forward pre-hook recomputes from ``weight_g`` / ``weight_v``
  before every forward.  On meta it is a meta tensor; it is no lost buffer, so it is never reported:
  it gets what the hook computes from the materialised parameters.

Only modules built on meta can hold the first two, so only those are looked at (planning a model
built normally costs one dictionary lookup per module).  Failures come back as the plan's own
:class:`~bufferfix.recovery.Recovery` values, like a buffer's.
"""
from . import containers, missing, recipes, recompute, recording, sources
from .sources import Attempt


class _Slots:
    """What :meth:`Materialisation._recovery` reads of a group: where the value lives."""

    def __init__(self, buffers=(), attributes=()):
        self.buffers, self.attributes = list(buffers), list(attributes)


class Extras:
    def __init__(self):
        self.container_slots = {}  # id(meta tensor) -> [containers.Slot holding it]
        self.missing = []  # modules whose constructor registers buffers only off meta
        self.weight_norm = []  # (module, name)

    def __bool__(self):
        return bool(self.container_slots or self.missing or self.weight_norm)

    # ------------------------------------------------------------------ planning
    def derived(self, module, name):
        """Is the meta attribute ``module.name`` recomputed from parameters by a weight-norm hook?
        (Then it is noted here, not planned as a lost value.)"""
        if weight_norm_hook(module, name) is None:
            return False
        self.weight_norm.append((module, name))
        return True

    def plan(self, modules):
        if not recording.has_any():
            return
        built_on_meta = [module for module in modules if recording.was_recorded(module)]
        empty = {}  # objects holding no meta tensor, walked once for all modules (see containers.slots)
        for module in built_on_meta:
            for slot in containers.slots(module, empty=empty):
                self.container_slots.setdefault(id(slot.tensor), []).append(slot)
        self.missing = missing.candidates(built_on_meta)

    # ------------------------------------------------------------------ after materialisation
    def restore(self, plan, device, failures):
        """Fill what was planned; append a Recovery to ``failures`` for each value not recovered."""
        for slots in self.container_slots.values():
            self._fill_container(plan, slots, failures)
        for module in self.missing:
            added, attempt = missing.add(module, device if device is not None else missing.device_of(plan.root))
            if attempt is not None:
                failures.append(plan._recovery(_Slots(buffers=[(module, "<buffers registered off meta>")]),
                                               sources.Found(None, attempts=(attempt,))))
        for module, name in self.weight_norm:
            hook = weight_norm_hook(module, name)
            if hook is not None and not any(p.is_meta for p in module._parameters.values() if p is not None):
                module.__dict__[name] = hook.compute_weight(module)

    @staticmethod
    def _fill_container(plan, slots, failures):
        slot = slots[0]
        owners = ((owner, relative.rstrip(".")) for owner, relative in recording.owners(slot.module, ""))
        value, _, attempts = containers.recover(slot, owners, recompute.registered_recompute, _replay_of)
        if value is None:
            failures.append(plan._recovery(_Slots(attributes=[(slot.module, slot.name)]),
                                           sources.Found(None, attempts=attempts)))
            return
        value = value.detach().clone()  # the replay's own tensor stays with the replay
        for other in slots:  # one tensor in several places stays one tensor
            containers.write(other, value)


def weight_norm_hook(module, name):
    """The legacy ``torch.nn.utils.weight_norm`` hook recomputing the plain attribute ``name`` of
    ``module`` before every forward, or None."""
    if not module._forward_pre_hooks:
        return None
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook
    return None


def _replay_of(module, attempts):
    """``(replayed module, randomised, origin)`` of ``module``'s recorded constructor, or None (the
    reason appended to ``attempts``)."""
    recipe = recording.recipe_of(module)
    if recipe is None:
        return None
    try:
        replayed, randomised = recipes.replay(recipe)
    except recipes.ReplayError as error:
        attempts.append(Attempt(recipe.origin, error.reason, error.detail))
        return None
    return replayed, randomised, recipe.origin

