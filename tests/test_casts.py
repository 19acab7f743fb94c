"""Dtype casts on meta, and attributes that a module's own ``_apply`` or a parameter gives.

Each test runs a flow in plain torch and judges it against a normal build seeded the same way
(:func:`test_seams.assert_exact_or_named`): every unsaved tensor bit-identical (value, dtype,
device, storage sharing), or named by its path with a true reason.
"""
import warnings

import torch
from compare import identical, loading_ends
from test_seams import assert_exact_or_named, recoveries_named, seeded
from torch import nn

from bufferfix import Reason


def _cast_on_meta(build, change, state_dict):
    """Meta build -> ``change(model)`` (user code) -> .to(torch.bfloat16) -> to_empty -> load."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = build()
        change(model)
        model.to(torch.bfloat16)
        model.to_empty(device="cpu")
        model.load_state_dict(state_dict)
        loading_ends()
    return model, caught


def _normal_build_cast(build, change):
    model = build()
    change(model)
    return model.to(torch.bfloat16)


# --------------------------------------------------------------------------- what the cast forgot

class Tables(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.register_buffer("written", torch.arange(3.0), persistent=False)
        self.register_buffer("replaced", torch.arange(3.0), persistent=False)


class MovesItsTable(nn.Module):
    """Its ``_apply`` converts its plain tensor attribute too, after ``Module._apply`` returned."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.table = torch.arange(3.0) / 3
        self.child = MovesItsTableChild()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.table = fn(self.table)
        return self


class MovesItsTableChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.arange(3.0) / 7

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.table = fn(self.table)
        return self


def _write_and_replace(model):
    model.written.add_(1)
    model.replaced = torch.full_like(model.replaced, 7.0)


def _write_tables(model):
    model.table.add_(1)
    model.child.table.add_(1)


def test_a_cast_on_meta_keeps_what_was_noted_of_each_tensor():
    """A buffer written in place and one replaced on meta, then cast: each converted tensor is a new
    meta tensor, and the facts noted of the one before follow it (named, not the constructor's value)."""
    build = seeded(Tables)
    reference = _normal_build_cast(build, _write_and_replace)
    model, caught = _cast_on_meta(build, _write_and_replace, reference.state_dict())
    named = assert_exact_or_named(model, reference, caught,
                                  allowed_reasons={Reason.MODIFIED_IN_PLACE, Reason.REPLACED})
    assert named == {"written": Reason.MODIFIED_IN_PLACE, "replaced": Reason.REPLACED}


def test_attributes_converted_by_a_module_own_apply_keep_what_was_noted():
    """The same for plain attributes that a module's own ``_apply`` converts (the model's root, whose
    ``_apply`` runs after ``Module._apply`` returned, and a child)."""
    build = seeded(MovesItsTable)
    reference = _normal_build_cast(build, _write_tables)
    model, caught = _cast_on_meta(build, _write_tables, reference.state_dict())
    named = assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.MODIFIED_IN_PLACE})
    assert named == {"table": Reason.MODIFIED_IN_PLACE, "child.table": Reason.MODIFIED_IN_PLACE}


def test_a_snapshot_follows_a_cast_on_meta():
    """A real model moved to meta, cast there, materialised: the snapshot is the value, cast."""
    reference = seeded(Tables)()
    _write_and_replace(reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = seeded(Tables)()
        _write_and_replace(model)
        model.to("meta").to(torch.bfloat16)
        reference.to(torch.bfloat16)
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        loading_ends()
    assert recoveries_named(caught) == []
    assert identical(model.written, reference.written) and identical(model.replaced, reference.replaced)


# --------------------------------------------------------------------------- attributes derived from parameters

class _Doubled(nn.Module):
    def forward(self, weight):
        return weight * 2


class ParametrizedBeside(nn.Module):
    """A replay of it calls a module (``register_parametrization`` runs its parametrization once)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.utils.parametrize.register_parametrization(nn.Linear(3, 3), "weight", _Doubled())
        self.register_buffer("table", torch.arange(3.0), persistent=False)


class WeightNormAndParametrized(nn.Module):
    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.normed = nn.utils.weight_norm(nn.Linear(3, 3))
        self.beside = ParametrizedBeside()


def test_a_replay_calling_a_module_is_not_the_first_forward():
    """to_empty(recurse=False) module by module: replaying ``beside`` (for its buffer) runs its
    parametrization, a module call; that is not the model's first forward, so weight_norm's
    ``weight`` is computed once loading ends, from the loaded parameters."""
    build = seeded(WeightNormAndParametrized)
    reference = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = build()
        for module in model.modules():
            module.to_empty(device="cpu", recurse=False)
        model.load_state_dict(reference.state_dict())
        loading_ends()
    assert_exact_or_named(model, reference, caught)
    assert identical(model.normed.weight, reference.normed.weight)


class Normed(nn.Module):
    """Legacy weight_norm's and spectral_norm's ``weight``: plain attributes derived from parameters."""

    def __init__(self):
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            self.weight_normed = nn.utils.weight_norm(nn.Linear(3, 3))
        self.spectral_normed = nn.utils.spectral_norm(nn.Linear(3, 3))


def test_derived_attributes_whose_parameters_were_cast_after_are_named():
    """A normal build + .to(bf16) keeps both ``weight``s as they were derived from the float32
    parameters before the cast (the cast leaves plain attributes alone); a bf16 checkpoint cannot
    give that value.  Named with that reason (weight_norm's was computed from the cast parameters,
    in bf16, unnamed; spectral_norm's named RANDOM)."""
    build = seeded(Normed)
    reference = _normal_build_cast(build, lambda model: None)
    model, caught = _cast_on_meta(build, lambda model: None, reference.state_dict())
    named = assert_exact_or_named(model, reference, caught, allowed_reasons={Reason.CAST_AFTER_DERIVED})
    assert named == {"weight_normed.weight": Reason.CAST_AFTER_DERIVED,
                     "spectral_normed.weight": Reason.CAST_AFTER_DERIVED}


def test_spectral_norm_weight_after_an_assign_load_is_its_loaded_parameter():
    """Meta build -> load_state_dict(assign=True): ``weight`` is the loaded ``weight_orig``'s data, its
    storage shared, as in a normal build (was named RANDOM)."""
    build = seeded(Normed)
    reference = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = build()
        model.load_state_dict(reference.state_dict(), assign=True)
        loading_ends()
    assert assert_exact_or_named(model, reference, caught) == {}
    weight, parameter = model.spectral_normed.weight, model.spectral_normed.weight_orig
    assert weight.untyped_storage().data_ptr() == parameter.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- a module's own _apply

def test_an_attribute_its_own_apply_moves_to_meta_is_snapshotted():
    """A real model moved with .to("meta"), whose modules' own ``_apply`` moves their plain tensor
    attributes too: those get their values back from a snapshot, like non-persistent buffers (they
    were named NO_RECIPE, and had no meta build to replay)."""
    build = seeded(MovesItsTable)
    reference = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build().to("meta")
        assert model.table.is_meta and model.child.table.is_meta
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        loading_ends()
    assert assert_exact_or_named(model, reference, caught) == {}


class MovesItsExpandedTable(MovesItsTable):
    def __init__(self):
        super().__init__()
        self.table = torch.arange(3.0).expand(2, 3)  # stride 0: a move lays it out afresh


def test_an_expanded_attribute_its_own_apply_moves_to_meta_stays_an_attribute():
    """The expanded attribute gets its old layout back after the move to meta, in its own slot: it
    does not become a buffer (a state dict key the normal build lacks, which loading would miss)."""
    build = seeded(MovesItsExpandedTable)
    reference = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build().to("meta")
        assert "table" not in model._buffers
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
        loading_ends()
    assert not caught
    # its values, dtype and device (a materialisation lays an expanded tensor out afresh, as to_empty does)
    assert torch.equal(model.table, reference.table) and model.table.dtype == reference.table.dtype
    assert model.table.device == reference.table.device
