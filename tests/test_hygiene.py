"""Patch hygiene: bufferfix coexists with other patches, threads, reloads, compile, and the GC."""
import copy
import functools
import gc
import importlib
import inspect
import threading
import weakref

import pytest
import torch
import wrapt
from compare import assert_matches_reference, broken_buffers, loading_ends
from models import Layer, Zoo
from torch import nn

import bufferfix
from bufferfix.flows import FLOWS

ORIGINAL_TO_EMPTY_SIGNATURE = "(self, *, device: 'DeviceLikeType | None', recurse: 'bool' = True) -> 'Self'"


def reference_zoo():
    torch.manual_seed(0)
    return Zoo()


def test_signature_and_docstring_are_unchanged():
    assert str(inspect.signature(nn.Module.to_empty)) == str(inspect.signature(nn.Module.to_empty.__wrapped__))
    assert nn.Module.to_empty.__doc__ == nn.Module.to_empty.__wrapped__.__doc__
    assert nn.Module.to_empty.__name__ == "to_empty"
    assert str(inspect.signature(nn.Linear)) == "(in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None"


def test_a_plain_wrapper_installed_after_bufferfix_survives_disable():
    calls = []
    original = nn.Module.__dict__["to_empty"]  # our wrapt wrapper, as the class holds it
    ours = nn.Module.to_empty  # the same, bound: what a plain wrapper calls

    @functools.wraps(ours)
    def theirs(self, *args, **kwargs):
        calls.append(type(self).__name__)
        return ours(self, *args, **kwargs)

    nn.Module.to_empty = theirs
    try:
        bufferfix.disable()  # cannot splice out from under a non-wrapt wrapper: ours goes inert
        reference = reference_zoo()
        # buffers kept real (init_empty_weights): only an active to_empty wrapper would restore them
        broken = FLOWS["init_empty_weights"](Zoo, reference.state_dict())
        assert calls == ["Zoo"] and broken_buffers(broken, reference) != []
        assert bufferfix.enable()
        fixed = FLOWS["torch.device('meta')"](Zoo, reference.state_dict())
        assert calls == ["Zoo", "Zoo"]
        assert_matches_reference(fixed, reference)
    finally:
        bufferfix.disable()
        nn.Module.to_empty = original.__wrapped__  # torch's own function: no stale wrapper left behind
        bufferfix.enable()
    assert isinstance(nn.Module.__dict__["to_empty"], wrapt.FunctionWrapper)


def test_a_wrapt_wrapper_installed_after_bufferfix_survives_disable():
    calls = []

    def counting(wrapped, instance, args, kwargs):
        calls.append(type(instance).__name__)
        return wrapped(*args, **kwargs)

    handle = wrapt.wrap_function_wrapper(nn.Module, "to_empty", counting)
    try:
        bufferfix.disable()
        assert nn.Module.__dict__["to_empty"] is handle  # theirs still outermost, ours spliced out
        assert not isinstance(handle.__wrapped__, wrapt.FunctionWrapper)
        reference = reference_zoo()
        FLOWS["torch.device('meta')"](Zoo, reference.state_dict())
        assert calls == ["Zoo"]
    finally:
        bufferfix.enable()
        wrapt.unwrap_object(nn.Module, "to_empty", handle)
    reference = reference_zoo()
    assert_matches_reference(FLOWS["torch.device('meta')"](Zoo, reference.state_dict()), reference)


def test_reload_is_idempotent():
    wrapper = nn.Module.__dict__["to_empty"]
    importlib.reload(bufferfix)
    assert nn.Module.__dict__["to_empty"] is wrapper
    assert not nn.modules.module._global_parameter_registration_hooks
    reference = reference_zoo()
    assert_matches_reference(FLOWS["torch.device('meta')"](Zoo, reference.state_dict()), reference)


def test_subclass_overriding_to_empty_and_calling_super():
    class Custom(Zoo):
        def to_empty(self, *, device, recurse=True):
            self.materialised_on = torch.device(device)
            return super().to_empty(device=device, recurse=recurse)

    torch.manual_seed(0)
    reference = Custom()
    model = FLOWS["torch.device('meta')"](Custom, reference.state_dict())
    assert model.materialised_on == torch.device("cpu")
    assert_matches_reference(model, reference)


def test_concurrent_materialisation_from_threads():
    reference = reference_zoo()
    errors, results = [], {}

    def work(index):
        try:
            results[index] = FLOWS["torch.device('meta')" if index % 2 else "init_empty_weights(include_buffers)"](
                Zoo, reference.state_dict())
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(results) == 6
    for model in results.values():
        assert_matches_reference(model, reference)


def test_materialising_twice():
    reference = reference_zoo()
    model = FLOWS["torch.device('meta')"](Zoo, reference.state_dict())
    model.to_empty(device="cpu")  # again: the real values are kept
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_models_are_garbage_collected():
    reference = reference_zoo()
    with torch.device("meta"):
        meta_only = Zoo()
    materialised = FLOWS["torch.device('meta')"](Zoo, reference.state_dict())
    moved = copy.deepcopy(reference).to("meta")
    watchers = [weakref.ref(model) for model in (meta_only, materialised, moved)]
    del meta_only, materialised, moved
    gc.collect()
    assert [watcher() for watcher in watchers] == [None, None, None]


def test_torch_compile_of_a_fixed_model():
    from models import Sinusoidal

    torch.manual_seed(0)
    reference = Sinusoidal(12, 6)
    model = FLOWS["torch.device('meta')"](lambda: Sinusoidal(12, 6), reference.state_dict())
    x = torch.randn(2, 12, 6)
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(compiled(x), reference(x))


def test_deepcopy_of_a_layer_built_on_meta_keeps_its_recipe_only_while_needed():
    from bufferfix.mechanism import recording

    with torch.device("meta"):
        layer = Layer(8)
    clone = copy.deepcopy(layer)
    assert recording.recipe_of(clone.rotary) is recording.recipe_of(layer.rotary) is not None
    clone.to_empty(device="cpu")
    assert recording.recipe_of(clone.rotary) is None  # materialised: recipe (and its replay cache) let go
    assert torch.equal(clone.rotary.inv_freq, Layer(8).rotary.inv_freq)


def test_module_by_module_materialisation_keeps_a_parent_recipe_only_until_its_subtree_is_done():
    from models import OnTorchChildren

    from bufferfix.mechanism import recording

    waiting_before = recording.awaiting_count()
    with torch.device("meta"):
        model = OnTorchChildren()
    modules = list(model.modules())  # parents first, as FSDP1 calls param_init_fn
    for module in modules[:-1]:
        module.to_empty(device="cpu", recurse=False)
    assert recording.recipe_of(model) is not None  # the last child may still need the root's replay
    modules[-1].to_empty(device="cpu", recurse=False)
    assert [recording.recipe_of(module) for module in modules] == [None] * len(modules)
    assert recording.awaiting_count() == waiting_before
    assert torch.equal(model.norm.offsets, torch.arange(4, dtype=torch.float32))


def test_torch_nn_classes_left_unrecorded_make_no_non_persistent_buffers():
    """bufferfix does not record the constructions of torch.nn's own classes (most of a model's
    modules); the premise is that none of their constructors makes a non-persistent buffer or a
    plain tensor attribute, in the torch version under test."""
    import pathlib

    from bufferfix.integrations import torch_nn

    unrecorded = torch_nn.INTEGRATION.unrecorded_classes
    assert {nn.Linear, nn.Embedding, nn.LayerNorm, nn.SiLU} <= unrecorded
    assert not {nn.Sequential, nn.ModuleList, nn.ModuleDict} & unrecorded  # containers: see torch_nn_own_classes
    sources = {cls: pathlib.Path(inspect.getsourcefile(cls)) for cls in unrecorded}
    for path in set(sources.values()):
        assert "persistent=False" not in path.read_text(), path
    with torch.device("meta"):
        built = [nn.Linear(4, 4), nn.Embedding(8, 4), nn.LayerNorm(4), nn.RMSNorm(4), nn.Conv1d(2, 2, 3),
                 nn.MultiheadAttention(4, 2), nn.TransformerEncoderLayer(4, 2), nn.GRU(4, 4), nn.BatchNorm1d(4)]
    for module in built:
        for sub in module.modules():
            assert not sub._non_persistent_buffers_set, type(sub)
            assert not [name for name, value in vars(sub).items()
                        if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)], type(sub)


# --------------------------------------------------------------------------- replays and register_parameter

class _TableAndLinear(nn.Module):
    """A buffer only a replay gives back, and a parameter the replay must not make real."""

    def __init__(self, width=64):
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.register_buffer("table", torch.arange(6.0) * 2, persistent=False)


class _FailsInItsReplay(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        if torch.empty(0).device.type == "cpu":  # a replay (on CPU), not the build on meta
            raise RuntimeError("this constructor cannot be replayed")
        self.register_buffer("table", torch.arange(6.0), persistent=False)


def test_replays_make_no_real_parameter_and_give_register_parameter_back():
    """While a replay runs, parameters are sent to meta as they are registered (only the buffers
    are wanted); afterwards, and after a replay that raised, nn.Module.register_parameter is
    torch's own function again, and no global parameter hook was ever added."""
    original = nn.Module.__dict__["register_parameter"]
    real = []

    def watch(module, name, param):  # a global hook runs inside register_parameter, after bufferfix's
        if param is not None and not param.is_meta:
            real.append((type(module).__name__, name))

    with torch.device("meta"):
        model, failing = _TableAndLinear(), _FailsInItsReplay()
    handle = nn.modules.module.register_module_parameter_registration_hook(watch)
    try:
        model.to_empty(device="cpu")
    finally:
        handle.remove()
    assert torch.equal(model.table, torch.arange(6.0) * 2)
    assert real == [], "a replay made real parameters"
    assert nn.Module.__dict__["register_parameter"] is original
    with pytest.warns(bufferfix.BufferFixWarning, match="table"):  # replayed twice: the second time with
        failing.to_empty(device="cpu")  # real parameters, in case a parameter was what it needed
        loading_ends()
    assert nn.Module.__dict__["register_parameter"] is original
    assert not nn.modules.module._global_parameter_registration_hooks


class _MaskOnParameterDevice(nn.Module):
    """timm Swin's pattern: under accelerate's init_empty_weights() this buffer is born on meta."""

    def __init__(self, width=8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        index = torch.arange(width, device=self.norm.weight.device)
        self.register_buffer("mask", (index[:, None] - index[None, :]).remainder(3).eq(0).float(), persistent=False)


class _PausesInItsReplay(nn.Module):
    pause = None  # called once, in the middle of the first replay of this class

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        pause, type(self).pause = type(self).pause, None
        if pause is not None and torch.empty(0).device.type == "cpu":
            pause()
        self.norm = nn.LayerNorm(4)  # registered after the pause: through whatever is on top by then
        self.register_buffer("table", torch.arange(6.0) * 2, persistent=False)


@pytest.mark.parametrize("enters", ["before the replay", "during the replay"])
@pytest.mark.parametrize("leaves", ["during the replay", "after the replay"])
def test_accelerate_in_another_thread_and_a_replay_nest(enters, leaves):
    """A replay puts its parameter conversion in front of nn.Module.register_parameter the way
    accelerate's init_empty_weights() puts its own: entered and left in another thread at any point
    of a replay, accelerate's context keeps that thread's parameters on meta (and the buffer made
    on one is recorded, so it comes out exact), the replay gives the reference's buffers, and
    torch's own function is back once both are done."""
    from accelerate import init_empty_weights

    original = nn.Module.__dict__["register_parameter"]
    inside, build, built, build_again, leave, left = (threading.Event() for _ in range(6))
    models = []

    def other_thread():
        with init_empty_weights():
            inside.set()
            build.wait(30)
            models.append(_MaskOnParameterDevice())
            built.set()
            build_again.wait(30)
            models.append(nn.Linear(2, 2))
            leave.wait(30)
        left.set()

    thread = threading.Thread(target=other_thread, daemon=True)

    def pause():
        if enters == "during the replay":
            thread.start()
            assert inside.wait(30)
        build.set()
        assert built.wait(30)
        if leaves == "during the replay":
            build_again.set()
            leave.set()
            assert left.wait(30)

    if enters == "before the replay":
        thread.start()
        assert inside.wait(30)
    with torch.device("meta"):
        model = _PausesInItsReplay()
    _PausesInItsReplay.pause = pause
    try:
        model.to_empty(device="cpu")
    finally:
        _PausesInItsReplay.pause = None
        build.set()
        build_again.set()
        leave.set()
        thread.join(30)
    assert not thread.is_alive() and len(models) == 2
    assert torch.equal(model.table, torch.arange(6.0) * 2)
    mask_built_there, linear_built_there = models
    assert mask_built_there.norm.weight.is_meta and linear_built_there.weight.is_meta  # accelerate's context held
    nn.Linear(2, 2)  # one left in place by accelerate takes itself off at a registration outside replays
    assert nn.Module.__dict__["register_parameter"] is original
    mask_built_there.to_empty(device="cpu")
    assert torch.equal(mask_built_there.mask, _MaskOnParameterDevice().mask)
