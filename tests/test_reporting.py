"""Never silent: what cannot be recovered is named; strict mode raises."""
import copy
import pickle
import warnings

import pytest
import torch
from compare import assert_matches_reference, identical, loading_ends
from models import Layer, Rotary, Zoo
from torch import nn

import bufferfix
from bufferfix.flows import FLOWS


class RandomProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 3))  # random parameter: fine, it is in the checkpoint
        self.register_buffer("projection", torch.randn(4, 4), persistent=False)
        self.register_buffer("steps", torch.arange(4.0), persistent=False)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.random = RandomProjection()


def meta_build(build):
    with torch.device("meta"):
        return build()


def test_random_buffer_is_reported_by_path_and_name():
    model = meta_build(Holder)
    with pytest.warns(bufferfix.UnrecoverableBufferWarning) as caught:
        model.to_empty(device="cpu")
        loading_ends()
    message = str(caught[0].message)
    assert "random.projection" in message and "RandomProjection" in message and "random number generator" in message
    assert "steps" not in message  # deterministic buffers of the same module are recovered
    assert torch.equal(model.random.steps, torch.arange(4.0))
    assert caught[0].filename == __file__  # attributed to the user's call, not to bufferfix


def test_each_reason_is_given_once_per_tensor_and_persistent_true_offered_for_your_own_class():
    model = meta_build(Holder)  # Holder's replay draws random.projection from the RNG too: the same reason
    with pytest.warns(bufferfix.UnrecoverableBufferWarning) as caught:
        model.to_empty(device="cpu")
        loading_ends()
    message = str(caught[0].message)
    [recovery] = caught[0].message.recoveries
    assert [attempt.reason for attempt in recovery.attempts] == [bufferfix.Reason.RANDOM] * 2  # both tried...
    assert message.count("random number generator") == 1, message  # ...the reason said once
    assert "in your own class RandomProjection, register the buffer with persistent=True" in message


def test_persistent_true_is_offered_only_for_code_outside_installed_packages():
    from bufferfix import reporting

    def recovery(owner, origin):
        return bufferfix.Recovery("x.table", owner, "buffer", None, origin, bufferfix.Reason.RANDOM,
                                  attempts=(bufferfix.Attempt(origin, bufferfix.Reason.RANDOM),))

    assert reporting.own_class(recovery("RandomProjection", __name__ + ".RandomProjection")) == "RandomProjection"
    assert reporting.own_class(recovery("Linear", "torch.nn.modules.linear.Linear")) is None  # site-packages
    assert reporting.own_class(recovery("Holder", __name__ + ".RandomProjection")) is None  # another class's recipe
    assert reporting.own_class(recovery("Holder", None)) is None  # nothing recorded: unknown


def test_a_declared_verdict_names_only_the_declared_buffers():
    from bufferfix.mechanism import recompute

    recompute.declare_unrecoverable(RandomProjection, ["steps"], bufferfix.Reason.FROM_PRETRAINED_WEIGHT)
    try:
        model = meta_build(Holder)
        with pytest.warns(bufferfix.UnrecoverableBufferWarning) as caught:
            model.to_empty(device="cpu")
            loading_ends()
    finally:
        recompute.undeclare_unrecoverable(RandomProjection)
    reasons = {recovery.name: recovery.reason for w in caught for recovery in w.message.recoveries}
    assert reasons == {"random.steps": bufferfix.Reason.FROM_PRETRAINED_WEIGHT,  # replay would give it: declared
                       "random.projection": bufferfix.Reason.RANDOM}  # not declared: its own verdict
    assert "test_reporting.RandomProjection computes 'steps' from its base layer's pretrained weight" in str(
        caught[0].message)


def test_strict_mode_raises(strict):
    model = meta_build(Holder)
    with pytest.raises(bufferfix.UnrecoverableBufferError, match="random.projection"):
        model.to_empty(device="cpu")
        loading_ends()


def test_in_place_change_after_construction_on_meta_is_reported():
    model = meta_build(lambda: Layer(4))
    model.rotary.inv_freq.mul_(2)  # on meta: the new values never existed
    with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="rotary.inv_freq.*modified in place"):
        model.to_empty(device="cpu")
        loading_ends()


def test_explicit_meta_device_argument_is_reported():
    class ExplicitMeta(nn.Module):
        def __init__(self, device):
            super().__init__()
            self.register_buffer("table", torch.arange(3.0, device=device), persistent=False)

    with torch.device("meta"):
        model = ExplicitMeta("meta")
    with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="table.*on meta explicitly"):
        model.to_empty(device="cpu")
        loading_ends()


def test_constructor_failing_on_replay_is_reported():
    built = []

    class OnlyOnce(nn.Module):
        def __init__(self):
            super().__init__()
            if built:
                raise RuntimeError("already built")
            built.append(self)
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    model = meta_build(OnlyOnce)
    with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="raised RuntimeError: already built"):
        model.to_empty(device="cpu")
        loading_ends()


def test_registered_recompute_function_wins():
    bufferfix.register_recompute(RandomProjection, lambda module: {"projection": torch.ones(4, 4)})
    try:
        model = meta_build(RandomProjection)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model.to_empty(device="cpu")
        assert torch.equal(model.projection, torch.ones(4, 4))
        assert torch.equal(model.steps, torch.arange(4.0))  # not covered by the function: replayed
    finally:
        from bufferfix.mechanism import recompute

        recompute.unregister_recompute(RandomProjection)


def test_never_replay_is_reported():
    class SideEffects(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(3.0), persistent=False)

    bufferfix.never_replay(SideEffects)
    model = meta_build(SideEffects)
    with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="never_replay"):
        model.to_empty(device="cpu")
        loading_ends()


def test_replay_leaves_global_state_alone():
    model = meta_build(Holder)
    torch.manual_seed(123)
    rng, dtype, device = torch.get_rng_state(), torch.get_default_dtype(), torch.get_default_device()
    with pytest.warns(bufferfix.UnrecoverableBufferWarning):
        model.to_empty(device="cpu")
        loading_ends()
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.get_default_dtype() == dtype and torch.get_default_device() == device


def test_recipe_uses_default_dtype_at_construction():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        reference = Zoo()
        model = meta_build(Zoo)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


class Counted(Rotary):
    constructions = 0

    def __init__(self, dim):
        type(self).constructions += 1
        super().__init__(dim)


def test_identical_recipes_are_replayed_once():
    model = meta_build(lambda: nn.ModuleList([Counted(8) for _ in range(8)]))
    before = Counted.constructions
    model.to_empty(device="cpu")
    assert Counted.constructions == before + 1
    assert all(identical(layer.inv_freq, Rotary(8).inv_freq) for layer in model)


def test_recipes_follow_deepcopy_outside_any_constructor():
    template = meta_build(lambda: Layer(8))
    model = nn.Sequential(*[copy.deepcopy(template) for _ in range(3)])  # Sequential(modules): not replayable
    reference = nn.Sequential(*[Layer(8) for _ in range(3)])
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_nothing_is_added_to_state_dict_pickle_or_torch_save(tmp_path):
    model = meta_build(Zoo)
    reference = Zoo()
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert b"bufferfix" not in pickle.dumps(model)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    torch.save(model, tmp_path / "model.pt")
    assert b"bufferfix" not in (tmp_path / "model.pt").read_bytes()
    assert_matches_reference(torch.load(tmp_path / "model.pt", weights_only=False), reference)
    assert_matches_reference(copy.deepcopy(model), reference)


def test_parameters_and_persistent_buffers_are_left_to_load_state_dict():
    reference = Zoo()
    materialised = FLOWS["torch.device('meta')"](Zoo, reference.state_dict())
    assert [name for name, _ in materialised.named_parameters()] == [name for name, _ in reference.named_parameters()]
    assert_matches_reference(materialised, reference)


class FromConfig(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / config.base ** (torch.arange(0, 8, 2).float() / 8), persistent=False)


def test_config_changed_after_construction_replays_with_the_values_at_construction():
    class Config:
        base = 10000.0

    config = Config()
    reference = FromConfig(config)
    model = meta_build(lambda: FromConfig(config))
    config.base = 500.0  # e.g. a RoPE-scaling tweak applied after the model was built
    model.to_empty(device="cpu")
    assert identical(model.inv_freq, reference.inv_freq)
    assert config.base == 500.0  # the user's object is left as they set it
    assert identical(meta_build(lambda: FromConfig(config)).to_empty(device="cpu").inv_freq, FromConfig(config).inv_freq)


def test_unrecoverable_buffer_is_named_by_full_path_in_per_module_materialisation():
    """FSDP1's param_init_fn materialises one module at a time; the message still names the path."""
    model = meta_build(lambda: nn.Sequential(nn.Linear(2, 2), Holder()))
    with pytest.warns(bufferfix.UnrecoverableBufferWarning, match=r"- 1\.random\.projection \(RandomProjection\)"):
        for module in model.modules():
            module.to_empty(device="cpu", recurse=False)
        loading_ends()
