"""Patch hygiene: bufferfix coexists with other patches, threads, reloads, compile, and the GC."""
import copy
import functools
import gc
import importlib
import inspect
import threading
import weakref

import torch
import wrapt
from torch import nn

import bufferfix
from bufferfix.flows import FLOWS
from compare import assert_matches_reference, broken_buffers
from models import Layer, Zoo

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
    assert len(nn.modules.module._global_parameter_registration_hooks) == 1
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
    from bufferfix.mechanism import recording
    from models import OnTorchChildren

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
