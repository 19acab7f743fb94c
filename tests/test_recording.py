"""When a construction is recorded: the constructor hook's cached "is meta the default device?".

The hook keeps its answer while this thread's mode stack keeps its length and no device context
was made since (issue 16: walking the stack per module cost a microsecond each).  Each test
changes the default device in a way that cache must notice, then checks the outcome that
matters: a module born on meta comes back bit-identical after ``to_empty``, and one born on CPU
is not recorded (bufferfix holds nothing for it).  Without bufferfix the same meta builds are
broken (``test_meta_build_is_broken_without_bufferfix``).
"""
import threading

import pytest
import torch
from compare import assert_matches_reference, broken_buffers, loading_ends
from models import Sinusoidal

import bufferfix


def reference():
    torch.manual_seed(0)
    return Sinusoidal(12, 6)


def materialised(model):
    model.to_empty(device="cpu")
    model.load_state_dict(reference().state_dict())
    return model


def records_of(build):
    """How many records ``build()`` left (its result kept alive while counting), and the result."""
    before = bufferfix.held().recipes
    model = build()
    return bufferfix.held().recipes - before, model


def test_meta_build_is_broken_without_bufferfix(without_bufferfix):
    with torch.device("meta"):
        model = Sinusoidal(12, 6)
    assert broken_buffers(materialised(model), reference()) == ["table"]


def test_set_default_device_meta():
    torch.set_default_device("meta")
    try:
        model = Sinusoidal(12, 6)
    finally:
        torch.set_default_device(None)
    assert_matches_reference(materialised(model), reference())
    count, _ = records_of(lambda: Sinusoidal(12, 6))
    assert count == 0  # back on CPU: nothing recorded


def test_alternating_meta_and_cpu_blocks_of_the_same_stack_length():
    for _ in range(3):
        with torch.device("meta"):
            on_meta = Sinusoidal(12, 6)
        with torch.device("cpu"):  # the same stack length as the meta block: a new context tells
            count, on_cpu = records_of(lambda: Sinusoidal(12, 6))
        assert count == 0
        assert_matches_reference(materialised(on_meta), reference())
        assert broken_buffers(on_cpu, reference()) == []  # its weights are its own random draw


def test_nested_cpu_block_inside_meta():
    with torch.device("meta"):
        before = Sinusoidal(12, 6)
        with torch.device("cpu"):
            count, inner = records_of(lambda: Sinusoidal(12, 6))
        after = Sinusoidal(12, 6)  # the inner context is gone: meta again
    assert count == 0
    assert broken_buffers(inner, reference()) == []
    for model in (before, after):
        assert_matches_reference(materialised(model), reference())


@pytest.mark.parametrize("repeat", range(3))
def test_threads_with_different_default_devices(repeat):
    """One thread builds on meta while another builds on CPU, in lock step: a thread never takes
    the other's answer."""
    steps = threading.Barrier(2)
    built, errors = {}, []

    def run(name, device):
        try:
            with torch.device(device):
                for index in range(4):
                    steps.wait(timeout=30)
                    built[name, index] = Sinusoidal(12, 6)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=("meta", "meta")), threading.Thread(target=run, args=("cpu", "cpu"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    for index in range(4):
        assert built["cpu", index].table.device.type == "cpu"
        assert broken_buffers(built["cpu", index], reference()) == []
        assert_matches_reference(materialised(built["meta", index]), reference())


def test_device_changed_while_bufferfix_was_disabled():
    with torch.device("cpu"):
        Sinusoidal(12, 6)  # the hook's cache: "not meta" for this stack length
    with torch.device("meta"):
        with bufferfix.disabled():
            pass
        model = Sinusoidal(12, 6)
    assert_matches_reference(materialised(model), reference())
    with bufferfix.disabled():
        with torch.device("meta"):
            pass
        context = torch.device("meta")
        context.__enter__()  # entered while disabled: the DeviceContext was made unseen
    try:
        model = Sinusoidal(12, 6)
    finally:
        context.__exit__(None, None, None)
    assert_matches_reference(materialised(model), reference())


# --------------------------------------------------------------------------- torch.nn's leaf classes
# They keep C's constructor (issue 16: most of a model's modules never enter Python), so a user's
# class made from one must get the recording hook by other means: when it is made after bufferfix
# is on (nn.Module.__init_subclass__), or before / while off (bufferfix.enable walks the subclasses).

def scaled_positions_class():
    class ScaledPositions(torch.nn.Embedding):
        def __init__(self, count, width, scale):
            super().__init__(count, width)
            self.register_buffer("positions", torch.arange(count) * scale, persistent=False)

    return ScaledPositions


def positions_model(cls):
    torch.manual_seed(0)
    return torch.nn.Sequential(cls(6, 4, 3), torch.nn.Linear(4, 4))


def test_leaf_subclass_is_broken_without_bufferfix(without_bufferfix):
    cls = scaled_positions_class()
    with torch.device("meta"):
        model = positions_model(cls)
    assert broken_buffers(materialised_like(model, positions_model(cls)), positions_model(cls)) == ["0.positions"]


def materialised_like(model, reference):
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    return model


def test_subclass_of_a_torch_nn_leaf_class_made_while_on():
    cls = scaled_positions_class()
    with torch.device("meta"):
        model = positions_model(cls)
    assert_matches_reference(materialised_like(model, positions_model(cls)), positions_model(cls))


def test_subclass_of_a_torch_nn_leaf_class_made_while_off():
    with bufferfix.disabled():
        cls = scaled_positions_class()
    with torch.device("meta"):
        model = positions_model(cls)
    assert_matches_reference(materialised_like(model, positions_model(cls)), positions_model(cls))


def test_subclass_of_a_torch_nn_leaf_class_made_before_import():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from torch import nn

        class ScaledPositions(nn.Embedding):
            def __init__(self, count, width, scale):
                super().__init__(count, width)
                self.register_buffer("positions", torch.arange(count) * scale, persistent=False)

        import bufferfix
        with torch.device("meta"):
            model = ScaledPositions(6, 4, 3)
        model.to_empty(device="cpu")
        print(model.positions.tolist())
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == str((torch.arange(6) * 3).tolist())


def test_torch_nn_leaf_constructions_are_not_recorded():
    count, _ = records_of(lambda: _on_meta(lambda: [torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.SiLU()]))
    assert count == 0


def _on_meta(build):
    with torch.device("meta"):
        return build()


class ScaledByItsOwnNew(torch.nn.Module):
    """A class with a ``__new__`` of its own: it calls ``super().__new__(cls)`` without the
    constructor's arguments (object.__new__ takes none), so the hook never sees them."""

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, scale=1.0):
        super().__init__()
        self.register_buffer("table", torch.arange(4.0) * scale, persistent=False)


def test_a_class_with_its_own_new_is_named_not_replayed_with_the_defaults(strict):
    """Replaying ``ScaledByItsOwnNew()`` as the hook saw the call would give scale 1.0's table: silent
    garbage.  It is not recorded; strict mode names the buffer."""
    with torch.device("meta"):
        model = ScaledByItsOwnNew(3.0)
    with pytest.raises(bufferfix.UnrecoverableBufferError) as raised:
        model.to_empty(device="cpu")
        loading_ends()
    assert [recovery.name for recovery in raised.value.recoveries] == ["table"]


def test_nothing_is_recorded_while_switched_off():
    """The hook's fast path (a class seen before is recorded at once) is emptied by disable()."""
    _on_meta(lambda: Sinusoidal(12, 6))
    with bufferfix.disabled():
        count, _ = records_of(lambda: _on_meta(lambda: Sinusoidal(12, 6)))
    assert count == 0
    count, _ = records_of(lambda: _on_meta(lambda: Sinusoidal(12, 6)))
    assert count > 0
