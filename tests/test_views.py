"""Views, aliases and storage sharing, each in plain torch: after a flow every tensor is bit-identical to
a normal build (value, dtype, device, and storage shared with the same tensors), or a warning names it
with a true reason (see test_seams.assert_exact_or_named)."""
import copy
import functools
import warnings

import pytest
import torch
from test_seams import BUILT_ON_META, assert_exact_or_named, recoveries_named, run_flow, seeded
from torch import nn

import bufferfix
from bufferfix import Reason
from bufferfix.flows import FLOWS


class LoadsPartOfARandomTable(nn.Module):
    """A random table no source can give, and a persistent buffer that is a view of its first row:
    loading writes that row, not the rest."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", torch.rand(3, 2), persistent=False)
        self.register_buffer("first", self.table[:1], persistent=True)


def test_a_persistent_view_loaded_does_not_make_its_base_whole():
    for flow in BUILT_ON_META:
        reference = seeded(LoadsPartOfARandomTable)()
        model, caught = run_flow(flow, seeded(LoadsPartOfARandomTable), reference.state_dict())
        named = assert_exact_or_named(model, reference, caught, {Reason.RANDOM})
        assert named == {"table": Reason.RANDOM}, flow
        assert torch.equal(model.first, reference.first)
        assert model.first.data_ptr() == model.table.data_ptr()
    # The model's own code rewriting the whole table before loading leaves nothing to report.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = seeded(LoadsPartOfARandomTable)()
        model.to_empty(device="cpu")
        model.table.copy_(reference.table)
        model.load_state_dict(reference.state_dict())
    assert recoveries_named(caught) == []
    assert_exact_or_named(model, reference, caught)


class SlicesAnAttribute(nn.Module):
    """A plain tensor attribute and a plain attribute that is a slice of it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.table = torch.arange(6.0).reshape(3, 2) * 2
        self.first = self.table[1:]


def test_a_slice_of_a_plain_attribute_is_a_view_of_it_again():
    for flow in BUILT_ON_META:
        reference = seeded(SlicesAnAttribute)()
        model, caught = run_flow(flow, seeded(SlicesAnAttribute), reference.state_dict())
        assert assert_exact_or_named(model, reference, caught) == {}, flow
        assert model.first._base is model.table or model.first.untyped_storage().data_ptr() == \
            model.table.untyped_storage().data_ptr(), flow


class SlicesAnAttributeIntoACheckpoint(nn.Module):
    """A plain tensor attribute and a persistent buffer that is a slice of it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.table = torch.arange(6.0)
        self.register_buffer("middle", self.table[1:3])


def test_after_a_move_to_meta_a_persistent_slice_of_a_plain_attribute_is_loaded_into_it():
    """``.to("meta")`` leaves the attribute real: the buffer is its slice again after
    materialisation, so loading another checkpoint writes the attribute, as in a normal build (it
    kept the values from before the move: stale)."""
    reference = SlicesAnAttributeIntoACheckpoint()
    checkpoint = {name: tensor + 100 for name, tensor in reference.state_dict().items()}
    reference.load_state_dict(checkpoint)
    model, caught = run_flow(".to('meta')", SlicesAnAttributeIntoACheckpoint, checkpoint)
    assert assert_exact_or_named(model, reference, caught) == {}
    assert torch.equal(model.table, torch.tensor([0.0, 101.0, 102.0, 3.0, 4.0, 5.0]))
    assert model.middle.untyped_storage().data_ptr() == model.table.untyped_storage().data_ptr()


class MovesItsListedTable(nn.Module):
    """Its ``_apply`` converts its plain tensor attribute too; a list holds a slice of it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.table = torch.arange(4.0) / 3
        self.listed = [self.table[1:]]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.table = fn(self.table)
        return self


def test_after_a_move_to_meta_an_attribute_its_own_apply_moved_shares_its_memory_again():
    """The attribute's snapshot (the real tensor the list's slice views) is the attribute again."""
    reference = MovesItsListedTable()
    model, caught = run_flow(".to('meta')", MovesItsListedTable, reference.state_dict())
    assert assert_exact_or_named(model, reference, caught) == {}
    assert model.listed[0].untyped_storage().data_ptr() == model.table.untyped_storage().data_ptr()


class SlicesAnExpandedTable(nn.Module):
    """An expanded table (stride 0 along its last dimension) and a slice of it, as buffers or as plain
    attributes."""

    def __init__(self, buffers=True):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        table = (torch.arange(3.0)[:, None] * 2 + 1).expand(3, 4)
        for name, tensor in (("table", table), ("rest", table[1:])):
            if buffers:
                self.register_buffer(name, tensor, persistent=False)
            else:
                setattr(self, name, tensor)


@pytest.mark.parametrize("buffers", [True, False])
@pytest.mark.parametrize("flow", list(FLOWS))
def test_a_slice_of_an_expanded_tensor_is_a_view_of_it_again(flow, buffers):
    build = functools.partial(SlicesAnExpandedTable, buffers)
    reference = seeded(build)()
    model, caught = run_flow(flow, seeded(build), reference.state_dict())
    assert assert_exact_or_named(model, reference, caught) == {}
    assert model.table.stride() == (1, 0) and model.rest.storage_offset() == 1


class SlicedTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", torch.arange(6.0).reshape(3, 2) * 2, persistent=False)
        self.register_buffer("rest", self.table[1:], persistent=False)
        self.first = self.table[0]
        self.last = [self.table[2]]


class HoldsADeepCopy(nn.Module):
    """A child kept as a ``copy.deepcopy`` (of meta tensors, under a meta build: each copied to storage of its own)."""

    def __init__(self):
        super().__init__()
        self.inner = copy.deepcopy(SlicedTable())


@pytest.mark.parametrize("flow", list(FLOWS))
def test_views_in_a_deep_copied_module_are_views_again(flow):
    reference = seeded(HoldsADeepCopy)()
    model, caught = run_flow(flow, seeded(HoldsADeepCopy), reference.state_dict())
    assert assert_exact_or_named(model, reference, caught) == {}


class ReplacesItsTable(nn.Module):
    """Views of a table that user code then replaces: no slot holds the tensor they are views of."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", torch.arange(6.0).reshape(3, 2) * 2, persistent=False)
        self.register_buffer("rest", self.table[1:], persistent=False)
        self.first = self.table[0]


def replaced_table():
    model = ReplacesItsTable()
    model.table = torch.full_like(model.table, 7)
    return model


@pytest.mark.parametrize("flow", FLOWS)
def test_views_of_a_replaced_tensor_share_its_memory_again(flow):
    reference = seeded(replaced_table)()
    model, caught = run_flow(flow, seeded(replaced_table), reference.state_dict())
    named = assert_exact_or_named(model, reference, caught, {Reason.REPLACED})
    assert set(named) <= {"table"}


class SparseTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.register_buffer("inv_freq", torch.arange(3.0), persistent=False)
        indices, values = torch.tensor([[0, 1], [1, 2]]), torch.tensor([1.0, 2.0])
        self.register_buffer("adjacency", torch.sparse_coo_tensor(indices, values, (3, 3)), persistent=False)


def test_a_sparse_buffer_has_no_storage_to_share_and_comes_back_like_any_other():
    """A sparse tensor has no storage (``untyped_storage()`` raises): planning views skips it
    instead of failing, which left every buffer of the model unfilled, named by no warning."""
    reference = SparseTable()
    model, caught = run_flow("torch.device('meta')", SparseTable, reference.state_dict())
    assert not [w for w in caught if issubclass(w.category, bufferfix.BufferFixWarning)]
    assert torch.equal(model.inv_freq, reference.inv_freq)
    assert torch.equal(model.adjacency.to_dense(), reference.adjacency.to_dense())


class SlicesItsTable(nn.Module):
    """A persistent buffer that is a slice of a persistent table."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.arange(3.0) + 1)
        self.register_buffer("first", self.table[:1])


class KeepsItsChildsTable(nn.Module):
    """Keeps its child's table in a dict; user code then gives the child another table, so only the dict
    holds the tensor the child's ``first`` is a view of."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.inner = SlicesItsTable()
        self.held = {"t": self.inner.table}


def kept_table(written=False):
    model = KeepsItsChildsTable()
    model.inner.table = torch.full_like(model.inner.table, 7)
    if written:  # through the view: the dict's tensor is no constructor's value any more
        model.inner.first.add_(1)
    return model


@pytest.mark.parametrize("written", [False, True])
@pytest.mark.parametrize("flow", ["torch.device('meta')", "init_empty_weights(include_buffers)"])
def test_a_persistent_view_of_a_tensor_only_a_container_holds_shares_its_memory_again(flow, written):
    """The dict's tensor, on meta, is not materialised (containers never are) but the child's ``first``
    is: the dict's tensor gets memory where ``first`` is, and ``first`` is a view of it again, so
    loading writes both, as in a normal build."""
    build = functools.partial(kept_table, written)
    reference = seeded(build)()
    model, caught = run_flow(flow, seeded(build), reference.state_dict())
    named = {recovery.name: recovery.reason for recovery in recoveries_named(caught)}
    assert named == ({"held['t']": Reason.MODIFIED_IN_PLACE} if written else {})
    held, first = model.held["t"], model.inner.first
    assert torch.equal(first, reference.inner.first) and first.dtype == torch.float32 and first.device.type == "cpu"
    assert held.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert first.storage_offset() == 0 and held.stride() == (1,)
    if not written:
        assert torch.equal(held, reference.held["t"])


class SlicesItsTableInADict(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.arange(4.0, dtype=torch.float64) + 0.5)
        self.held = {"t": self.table[:1]}


class KeepsADeepCopy(nn.Module):
    """``copy.deepcopy`` of a CPU module makes the dict's slice a tensor of its own on the table's memory
    (a version counter of its own); on meta it stays a view."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.inner = copy.deepcopy(SlicesItsTableInADict())


def table_written_in_place():
    model = KeepsADeepCopy()
    model.inner.table.add_(1)  # the dict's slice shares that memory: its value changes too
    return model


def test_a_slice_in_a_deep_copy_written_through_its_table_is_named_modified_in_place():
    """Cast to bfloat16 on meta, the table is a tensor of its own and the dict's float64 slice shares no
    memory with it: no source has the value the write gave it, and the reason is true (the normal build's
    slice holds the written value, not its constructor's), though the normal build's slice kept its own
    version counter.  The tree oracle saw only that counter and called the reason false."""
    reference = seeded(table_written_in_place)()
    reference.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = seeded(table_written_in_place)()
        model.to(torch.bfloat16)
        model.to_empty(device="cpu")
        model.load_state_dict(reference.state_dict())
    named = {recovery.name: recovery.reason for recovery in recoveries_named(caught)}
    assert named == {"inner.held['t']": Reason.MODIFIED_IN_PLACE}
    assert reference.inner.held["t"].item() == 1.5  # not the constructor's 0.5
    assert torch.equal(model.inner.table, reference.inner.table)


def test_the_tree_oracle_calls_a_write_through_shared_memory_a_modification():
    import trees
    inner = trees.NodeSpec(params="none", slots=(trees.Slot(kind="persistent", value="float64", change="in_place"),
                                                 trees.Slot(kind="dict", view="slice")))
    tree = trees.Tree(root=trees.NodeSpec(children=(trees.Child(node=inner, copied=True),)), flow="bf16 cast on meta")
    outcomes = {outcome.name: outcome for outcome in trees.judge(tree)}
    assert outcomes["c0.s1['t']"].verdict is trees.Verdict.NAMED, outcomes["c0.s1['t']"]


class ListsItsTable(nn.Module):
    """A list attribute holding a non-persistent table, and a dict holding a slice of it."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.arange(4.0) * 2, persistent=False)
        self.listed = [self.table]
        self.held = {"t": self.table[1:]}


def test_after_a_move_to_meta_containers_share_the_table_again():
    """``.to("meta")`` leaves the list and dict holding the real tensors: the table's snapshot is the
    tensor they hold, and it is the table again after materialisation, so they share its memory."""
    reference = ListsItsTable()
    model, caught = run_flow(".to('meta')", ListsItsTable, reference.state_dict())
    assert recoveries_named(caught) == []
    assert torch.equal(model.table, reference.table)
    assert model.listed[0] is model.table
    assert model.held["t"].untyped_storage().data_ptr() == model.table.untyped_storage().data_ptr()
    assert model.held["t"].storage_offset() == 1


class ListsAPersistentTable(nn.Module):
    """A persistent table held in a list, and slices of it in a tuple and a dict."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.arange(4.0) * 2)
        self.listed = [self.table]
        self.paired = (self.table[1:],)
        self.held = {"t": self.table[2:]}


def test_after_a_move_to_meta_containers_hold_the_loaded_persistent_table():
    """``.to("meta")`` leaves the containers holding the real table: it is the table again after
    materialisation, so loading another checkpoint writes what they hold, as in a normal build (they
    held the values from before the move: stale)."""
    reference = ListsAPersistentTable()
    checkpoint = {name: tensor + 100 for name, tensor in reference.state_dict().items()}
    reference.load_state_dict(checkpoint)
    model, caught = run_flow(".to('meta')", ListsAPersistentTable, checkpoint)
    assert recoveries_named(caught) == []
    assert_exact_or_named(model, reference, caught)
    assert model.listed[0] is model.table
    assert torch.equal(model.held["t"], torch.tensor([104.0, 106.0]))
    assert model.paired[0].untyped_storage().data_ptr() == model.table.untyped_storage().data_ptr()


def test_copies_of_a_model_moved_to_meta_do_not_share_its_snapshot():
    """A deep copy of the meta model has the same snapshot: only the first materialisation makes it its
    buffer; the other gets memory of its own."""
    model = ListsItsTable().to("meta")
    other = copy.deepcopy(model)
    model.to_empty(device="cpu")
    other.to_empty(device="cpu")
    assert torch.equal(model.table, other.table)
    assert model.table.untyped_storage().data_ptr() != other.table.untyped_storage().data_ptr()


# --------------------------------------------------------------------------- load_state_dict(assign=True)

class SlicedByAPersistentBuffer(nn.Module):
    """A plain tensor attribute, and a persistent buffer that is a slice of it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.table = torch.arange(6.0).reshape(3, 2) * 2
        self.register_buffer("rest", self.table[1:])


class ViewsAPersistentBuffer(nn.Module):
    """A persistent table, a non-persistent buffer that is a slice of it and a plain attribute that is a row."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", torch.arange(6.0).reshape(3, 2) * 2)
        self.register_buffer("rest", self.table[1:], persistent=False)
        self.first = self.table[0]


class AliasesAPersistentBuffer(nn.Module):
    """One tensor, registered as a non-persistent and as a persistent buffer, and held in a list."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        table = torch.arange(4.0) + 0.5
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("saved", table)
        self.listed = [table]


def aliased_table_written():
    model = AliasesAPersistentBuffer()
    model.table.add_(1)  # the checkpoint has the written value, through ``saved``
    return model


def assign_load(build, state_dict):
    """What torch.distributed.checkpoint does: a meta build, then ``load_state_dict(assign=True)``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.device("meta"):
            model = build()
        model.load_state_dict(state_dict, assign=True)
    return model, caught


def _storage(tensor):
    return tensor.untyped_storage().data_ptr()


@pytest.mark.parametrize("cloned", [False, True])  # the checkpoint's tensors share the normal build's memory, or not
def test_after_an_assign_load_a_persistent_view_of_an_attribute_is_a_view_of_it_again(cloned):
    reference = seeded(SlicedByAPersistentBuffer)()
    state_dict = {key: value.clone() if cloned else value for key, value in reference.state_dict().items()}
    model, caught = assign_load(seeded(SlicedByAPersistentBuffer), state_dict)
    assert assert_exact_or_named(model, reference, caught) == {}
    assert torch.equal(model.rest, reference.rest) and torch.equal(model.table, reference.table)
    assert _storage(model.rest) == _storage(model.table) and model.rest.storage_offset() == 2


@pytest.mark.parametrize("cloned", [False, True])
def test_after_an_assign_load_views_of_a_persistent_buffer_are_views_of_the_loaded_tensor(cloned):
    reference = seeded(ViewsAPersistentBuffer)()
    state_dict = {key: value.clone() if cloned else value for key, value in reference.state_dict().items()}
    model, caught = assign_load(seeded(ViewsAPersistentBuffer), state_dict)
    assert assert_exact_or_named(model, reference, caught) == {}
    assert model.table is state_dict["table"]  # assigned, as torch does
    assert _storage(model.rest) == _storage(model.table) == _storage(model.first)
    assert model.rest.storage_offset() - model.table.storage_offset() == 2


@pytest.mark.parametrize("build", [AliasesAPersistentBuffer, aliased_table_written])
def test_after_an_assign_load_aliases_of_a_persistent_buffer_are_the_loaded_tensor(build):
    """Every slot holding the persistent buffer's tensor holds the loaded tensor, which has the right
    value: nothing is named (a value written in place after the constructor is in the checkpoint)."""
    reference = seeded(build)()
    model, caught = assign_load(seeded(build), reference.state_dict())
    assert assert_exact_or_named(model, reference, caught) == {}
    assert model.table is model.saved and model.listed[0] is model.saved


def test_after_an_assign_load_a_persistent_view_loaded_does_not_make_its_base_whole():
    """The random table's rest is no checkpoint's: the table is named, its loaded row is a view of it again."""
    reference = seeded(LoadsPartOfARandomTable)()
    model, caught = assign_load(seeded(LoadsPartOfARandomTable), reference.state_dict())
    assert assert_exact_or_named(model, reference, caught, {Reason.RANDOM}) == {"table": Reason.RANDOM}
    assert torch.equal(model.first, reference.first) and _storage(model.first) == _storage(model.table)


def test_after_an_assign_load_of_another_dtype_views_keep_the_normal_builds_dtype():
    """``assign=True`` keeps the checkpoint's dtype in the persistent buffer: a view of it would have that
    dtype too, so the non-persistent slice is filled on its own, in the dtype a normal build gives it."""
    reference = seeded(ViewsAPersistentBuffer)()
    state_dict = {key: value.to(torch.bfloat16) for key, value in reference.state_dict().items()}
    model, caught = assign_load(seeded(ViewsAPersistentBuffer), state_dict)
    assert recoveries_named(caught) == []
    assert model.table.dtype == torch.bfloat16  # as torch assigns it
    assert model.rest.dtype == model.first.dtype == torch.float32
    assert torch.equal(model.rest, reference.rest) and torch.equal(model.first, reference.first)


class SlicesAnExpandedTableIntoACheckpoint(nn.Module):
    """A persistent slice of an expanded (stride 0) non-persistent table."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", (torch.arange(3.0)[:, None] * 2 + 1).expand(3, 4), persistent=False)
        self.register_buffer("rest", self.table[1:])


def test_after_an_assign_load_a_persistent_slice_of_an_expanded_table_is_a_view_of_it_again():
    """The loaded value is written into the table's memory (a normal build's ``load_state_dict`` cannot
    write an expanded buffer; this one is expanded as the table is)."""
    reference = seeded(SlicesAnExpandedTableIntoACheckpoint)()
    model, caught = assign_load(seeded(SlicesAnExpandedTableIntoACheckpoint), reference.state_dict())
    assert [str(w.message) for w in caught if issubclass(w.category, bufferfix.BufferFixWarning)] == []
    assert torch.equal(model.table, reference.table) and torch.equal(model.rest, reference.rest)
    assert model.table.stride() == (1, 0) and _storage(model.rest) == _storage(model.table)


class ViewsAnExpandedPersistentTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("table", (torch.arange(3.0)[:, None] * 2 + 1).expand(3, 4))
        self.register_buffer("rest", self.table[1:], persistent=False)


@pytest.mark.parametrize("contiguous", [False, True])
def test_after_an_assign_load_of_a_table_saved_otherwise_laid_out_its_views_are_views_of_it_again(contiguous):
    """A checkpoint saved contiguous (safetensors) holds the expanded table laid out afresh: the table is
    laid out as the meta one was again, so its slice is a view of it."""
    reference = seeded(ViewsAnExpandedPersistentTable)()
    state_dict = {key: value.contiguous() if contiguous else value for key, value in reference.state_dict().items()}
    model, caught = assign_load(seeded(ViewsAnExpandedPersistentTable), state_dict)
    assert assert_exact_or_named(model, reference, caught) == {}
    assert torch.equal(model.table, reference.table) and model.table.stride() == (1, 0)
    assert _storage(model.rest) == _storage(model.table) and model.rest.storage_offset() == 1


class Inner(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        _hold(self, "t", torch.arange(4.0) * 2 + 1, kind)


def _hold(module, name, tensor, kind):
    if kind == "attribute":
        setattr(module, name, tensor)
    else:
        module.register_buffer(name, tensor, persistent=kind == "persistent")


class PutsAViewOnItsChild(nn.Module):
    """A tensor of its own (``kind``) and, on its child, a non-persistent buffer that is that tensor or a
    slice of it; or (``from_child``) a tensor of its own that is its child's."""

    def __init__(self, kind, view):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.inner = Inner(kind if view == "from_child" else "persistent")
        if view == "from_child":
            _hold(self, "mine", self.inner.t, "buffer")
            return
        _hold(self, "table", torch.arange(4.0) * 3 + 2, kind)
        self.inner.register_buffer("up", self.table[1:3] if view == "slice" else self.table, persistent=False)


@pytest.mark.parametrize("view", ["alias", "slice", "from_child"])
@pytest.mark.parametrize("kind", ["attribute", "persistent", "buffer"])
def test_storage_shared_across_modules_is_shared_again_module_by_module(kind, view):
    """Materialised one module at a time (``to_empty(recurse=False)``), a tensor held by a module and
    its child is one storage again, as in a normal build."""
    build = functools.partial(PutsAViewOnItsChild, kind, view)
    reference = seeded(build)()
    model, caught = run_flow("to_empty(recurse=False)", seeded(build), reference.state_dict())
    assert assert_exact_or_named(model, reference, caught) == {}


class KeepsItsChildsTensor(nn.Module):
    """A persistent buffer that is its child's tensor, changed in place after construction (no source has
    its value); ``held``: a dict holds it too (so the buffer's value is looked for), or the buffer is
    non-persistent and the child's tensor a persistent buffer (so loading writes it through the child)."""

    def __init__(self, held):
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))
        self.inner = Inner("attribute" if held else "persistent")
        self.register_buffer("mine", self.inner.t, persistent=held)
        if held:
            self.held = {"t": self.inner.t}


def changed_childs_tensor(held):
    model = KeepsItsChildsTensor(held)
    model.inner.t.add_(1)
    return model


@pytest.mark.parametrize("held", [False, True])
def test_a_value_loading_writes_through_another_module_is_not_named_module_by_module(held):
    """The value cannot be recovered when the first module is materialised; loading writes it, through
    a persistent buffer of either module: nothing is named, as when the model is materialised at once."""
    build = functools.partial(changed_childs_tensor, held)
    reference = seeded(build)()
    model, caught = run_flow("to_empty(recurse=False)", seeded(build), reference.state_dict())
    assert recoveries_named(caught) == []
    assert assert_exact_or_named(model, reference, caught) == {}
