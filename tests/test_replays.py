"""Replays that are the constructor's call as it was: a tensor replaced after construction, values
drawn from the random number generator, names, side effects.  Plain torch; each test judges a real
flow against a normal build seeded the same way (see test_seams.assert_exact_or_named)."""
import copy

import torch
from compare import loading_ends
from test_seams import assert_exact_or_named, run_flow, seeded
from torch import nn

from bufferfix import Reason

META, EMPTY_WEIGHTS = "torch.device('meta')", "init_empty_weights"


class Cache(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.table = torch.arange(3.0) + 0.5
        self.tables = [torch.arange(3.0) * 2, 1]
        self.pair = (torch.arange(3.0) * 3,)


class HoldsCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.cache = Cache()


def _replace_cache_tensors(model):
    cache = model.cache
    cache.table = torch.full_like(cache.table, 7)
    cache.tables[0] = torch.full_like(cache.tables[0], 7)
    cache.pair = (torch.full_like(cache.pair[0], 7),)


def _built_and_replaced(build):
    def build_and_replace():
        model = build()
        _replace_cache_tensors(model)
        return model
    return build_and_replace


def test_attribute_and_container_tensors_replaced_on_meta_are_named():
    """A tensor that user code put in a plain or container attribute of a meta model has no value a
    replay can give: named REPLACED, never the constructor's value."""
    reference = _built_and_replaced(seeded(HoldsCache))()
    model, caught = run_flow(META, _built_and_replaced(seeded(HoldsCache)), reference.state_dict())
    named = assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.REPLACED})
    assert named == {"cache.table": Reason.REPLACED, "cache.tables[0]": Reason.REPLACED,
                     "cache.pair[0]": Reason.REPLACED}


class MaybeCache(nn.Module):
    """The same attributes whether filled or not: tensors, or values of other types."""

    def __init__(self, filled):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.table = torch.arange(3.0) + 0.5 if filled else None
        self.tables = [torch.arange(3.0) * 2 if filled else 0, 1]
        self.pair = (torch.arange(3.0) * 3 if filled else 0,)


class EmptyThenFilledCache(nn.Module):
    """A module holding no tensor, then one of its class laid out the same that holds some."""

    def __init__(self):
        super().__init__()
        self.empty = MaybeCache(False)
        self.cache = MaybeCache(True)


def test_tensors_replaced_in_a_module_whose_class_held_none_before_are_named():
    """What each module's constructor left is looked at module by module: an earlier one of the
    class holding no tensor says nothing of the next."""
    reference = _built_and_replaced(seeded(EmptyThenFilledCache))()
    model, caught = run_flow(META, _built_and_replaced(seeded(EmptyThenFilledCache)), reference.state_dict())
    named = assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.REPLACED})
    assert named == {"cache.table": Reason.REPLACED, "cache.tables[0]": Reason.REPLACED,
                     "cache.pair[0]": Reason.REPLACED}


class NoisyBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.register_buffer("noise", torch.rand(3), persistent=False)


class HoldsNoise(nn.Module):
    def __init__(self):
        super().__init__()
        self.noisy = NoisyBuffer()


def _replace_noise(build):
    def build_and_replace():
        model = build()
        model.noisy.noise = torch.full((3,), 7.0)
        return model
    return build_and_replace


def test_random_buffer_replaced_by_user_code_under_init_empty_weights_is_kept():
    """Under init_empty_weights buffers stay real: one that user code replaced holds the user's
    value, not one drawn at random by the constructor, and stands."""
    reference = _replace_noise(seeded(HoldsNoise))()
    model, caught = run_flow(EMPTY_WEIGHTS, _replace_noise(seeded(HoldsNoise)), reference.state_dict())
    loading_ends()
    assert assert_exact_or_named(model, reference, caught) == {}


class Coin(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("heads", torch.rand(1) > 0.3, persistent=False)


class DrawsThenCoin(nn.Module):
    """The parent's nn.Linear draws first (not in a replay, whose parameters are on meta); the
    child's one random bit comes out the same from the replay's two seeds (0 and 1), and differs
    from the normal build's."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.coin = Coin()


def test_random_bool_equal_under_two_seeds_is_named_random():
    reference = seeded(DrawsThenCoin)()
    model, caught = run_flow(META, seeded(DrawsThenCoin), reference.state_dict())
    assert assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.RANDOM}) == {
        "coin.heads": Reason.RANDOM}


class NoiseInAList(nn.Module):
    """A random tensor drawn after an nn.Linear's initialisation, held in a list; a parent puts
    another random buffer on it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.noise = [torch.rand(3)]


class PutsNoiseOnItsChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.child = NoiseInAList()
        self.child.register_buffer("jitter", torch.rand(3), persistent=False)


def test_random_values_in_a_container_or_on_a_child_under_init_empty_weights_are_named_random():
    """init_empty_weights skips the nn.Linear's draws, so the later draws differ from a normal
    build's: named RANDOM, as they are under torch.device('meta')."""
    reference = seeded(PutsNoiseOnItsChild)()
    for flow in (META, EMPTY_WEIGHTS):
        model, caught = run_flow(flow, seeded(PutsNoiseOnItsChild), reference.state_dict())
        loading_ends()
        assert assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.RANDOM}) == {
            "child.noise[0]": Reason.RANDOM, "child.jitter": Reason.RANDOM}, flow


class NoisyWithItsOwnNew(nn.Module):
    """A class with a __new__ of its own (never recorded) drawing a random buffer."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self):
        super().__init__()
        self.register_buffer("noise", torch.randint(0, 100, (4,)), persistent=False)


class KeepsDrawnChildren(nn.Module):
    """Draws after an nn.Linear's initialisation, in a child never recorded and in a deep copy."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.own_new = NoisyWithItsOwnNew()
        self.copied = copy.deepcopy(NoisyBuffer())


def _written_in_place(build):
    def build_and_write():
        model = build()
        model.own_new.noise.add_(1)
        model.copied.noise.mul_(2)
        return model
    return build_and_write


def test_random_buffers_written_in_place_under_init_empty_weights_are_named_random():
    """init_empty_weights skips the nn.Linear's draws, so the later draws differ from a normal
    build's, and so does what user code writes in place from them: named RANDOM, also in a module of
    a class never recorded and in a deep copy (whose original module is gone)."""
    reference = _written_in_place(seeded(KeepsDrawnChildren))()
    model, caught = run_flow(EMPTY_WEIGHTS, _written_in_place(seeded(KeepsDrawnChildren)), reference.state_dict())
    loading_ends()
    assert assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.RANDOM}) == {
        "own_new.noise": Reason.RANDOM, "copied.noise": Reason.RANDOM}


class NoisyLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("noise", torch.rand(3), persistent=False)


class RootWithItsOwnNew(nn.Module):
    """A class with a __new__ of its own is never recorded."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.leaf = NoisyLeaf()


def test_per_module_materialisation_names_a_tensor_by_its_path_below_an_unrecorded_root():
    reference = seeded(RootWithItsOwnNew)()
    model, caught = run_flow("to_empty(recurse=False)", seeded(RootWithItsOwnNew), reference.state_dict())
    loading_ends()
    assert assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.RANDOM}) == {
        "leaf.noise": Reason.RANDOM}


class HoldsACopiedCache(nn.Module):
    def __init__(self):
        super().__init__()
        self.copied = copy.deepcopy(HoldsCache())  # its child is copied too: no registration notes it


def test_tensors_replaced_in_a_deep_copied_module_are_named():
    """A deep copy keeps the note of what its original's constructor left (each tensor as copied):
    a tensor user code replaced in the copy's child is named REPLACED, never given the constructor's value."""
    def build():
        model = seeded(HoldsACopiedCache)()
        _replace_cache_tensors(model.copied)
        return model

    reference = build()
    model, caught = run_flow(META, build, reference.state_dict())
    named = assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.REPLACED})
    assert named == {"copied.cache.table": Reason.REPLACED, "copied.cache.tables[0]": Reason.REPLACED,
                     "copied.cache.pair[0]": Reason.REPLACED}
