"""Faults: materialisations that raise part of the way, retries, repeats, threads, soak.

Every case ends exact (bit for bit against a normal build) or loud (an
UnrecoverableBufferWarning naming the buffer), and the exception the user sees is the one
their call raised.  Uninitialised memory is poisoned (conftest), so garbage cannot pass.
"""
import subprocess
import sys
import textwrap
import threading
import traceback
import warnings

import pytest
import torch
from compare import assert_matches_reference, broken_buffers, loading_ends
from models import Layer, Rotary, Sinusoidal, Zoo
from torch import nn
from torch.overrides import TorchFunctionMode

import bufferfix
from bufferfix.integrations.base import Restoring
from bufferfix.mechanism import restore

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"


class Stack(nn.Module):
    """A few layers, each with a rotary-style buffer (and its 4.x-style aliasing attribute)."""

    def __init__(self, layers=5, dim=8):
        super().__init__()
        self.layers = nn.ModuleList([Layer(dim) for _ in range(layers)])
        self.table = Sinusoidal(6, dim)


def reference_and_meta(build=Stack):
    torch.manual_seed(0)
    reference = build()
    with torch.device("meta"):
        model = build()
    return reference, model


def _raise(error):
    def apply(*args, **kwargs):
        raise error

    return apply


def fail_in_apply(module, error):
    """The module's ``_apply`` raises, as a device OOM does part of the way through ``to_empty``."""
    module._apply = _raise(error)
    return lambda: module.__dict__.pop("_apply")


class FailingAllocation(TorchFunctionMode):
    """The ``count``-th ``torch.empty_like`` raises (one parameter's allocation fails)."""

    def __init__(self, count, error):
        super().__init__()
        self.count, self.error = count, error

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.empty_like:
            self.count -= 1
            if self.count == 0:
                raise self.error
        return func(*args, **(kwargs or {}))


def raises_its_own(call, error):
    """``call()`` raises exactly ``error`` (the same object), from where it was raised."""
    with pytest.raises(type(error)) as caught:
        call()
    assert caught.value is error
    return caught.value


def quiet(call):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the buffers came back exact
        return call()


# --------------------------------------------------------------------------- the reported case

def test_oom_in_the_third_layer_then_retry_and_load_is_exact():
    reference, model = reference_and_meta()
    error = RuntimeError(OOM)
    undo = fail_in_apply(model.layers[2].linear, error)
    raises_its_own(lambda: model.to_empty(device="cpu"), error)
    # what was materialised before the error already holds its values
    assert broken_buffers(model.layers[0], reference.layers[0]) == []
    assert broken_buffers(model.layers[1], reference.layers[1]) == []
    undo()  # the user frees memory and retries
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_oom_then_retry_is_silent_garbage_without_the_fault_handling(monkeypatch):
    """What the fault handling is for: without it the reported case keeps garbage, silently."""
    monkeypatch.setattr(restore.Materialisation, "restore_after_error", lambda self, device=None: [])
    monkeypatch.setattr(restore, "left_unfilled", lambda tensor: None)
    reference, model = reference_and_meta()
    undo = fail_in_apply(model.layers[2].linear, RuntimeError(OOM))
    with pytest.raises(RuntimeError):
        model.to_empty(device="cpu")
    undo()
    quiet(lambda: model.to_empty(device="cpu"))  # no warning...
    model.load_state_dict(reference.state_dict())
    assert broken_buffers(model, reference) != []  # ...and garbage


def test_oom_then_retry_is_broken_without_bufferfix(without_bufferfix):
    reference, model = reference_and_meta()
    undo = fail_in_apply(model.layers[2].linear, RuntimeError(OOM))
    with pytest.raises(RuntimeError):
        model.to_empty(device="cpu")
    undo()
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert broken_buffers(model, reference) != []


def test_the_users_exception_keeps_its_traceback():
    _, model = reference_and_meta()
    error = RuntimeError(OOM)
    fail_in_apply(model.layers[1].linear, error)
    caught = raises_its_own(lambda: model.to_empty(device="cpu"), error)
    last = traceback.extract_tb(caught.__traceback__)[-1]
    assert last.name == "apply" and last.filename == __file__  # raised where the user's code raised it


# --------------------------------------------------------------------------- every stage

@pytest.mark.parametrize("error", [RuntimeError(OOM), KeyboardInterrupt()], ids=["oom", "keyboard-interrupt"])
@pytest.mark.parametrize("recurse", [True, False], ids=["recurse", "module-by-module"])
def test_allocation_of_one_parameter_fails(error, recurse):
    reference, model = reference_and_meta()
    modules = [model] if recurse else list(model.modules())
    with FailingAllocation(7, error):
        with pytest.raises(type(error)) as caught:
            for module in modules:
                module.to_empty(device="cpu", recurse=recurse)
    assert caught.value is error
    for module in modules:  # retry
        quiet(lambda module=module: module.to_empty(device="cpu", recurse=recurse))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_keyboard_interrupt_in_apply_then_retry():
    reference, model = reference_and_meta()
    error = KeyboardInterrupt()
    undo = fail_in_apply(model.layers[3], error)
    raises_its_own(lambda: model.to_empty(device="cpu"), error)
    undo()
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_the_restore_itself_interrupted_leaves_marks_that_the_retry_fills(monkeypatch):
    """A second interrupt while bufferfix fills what was materialised: the tensors it did not get
    to stay marked, and the next materialisation fills them instead of keeping them."""
    import gc

    gc.collect()
    start = bufferfix.held().pending
    reference, model = reference_and_meta()
    real_fill = restore.Materialisation.fill
    calls = []

    def interrupted_fill(self, group, target, failures, device=None):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_fill(self, group, target, failures, device)

    monkeypatch.setattr(restore.Materialisation, "fill", interrupted_fill)
    with pytest.raises(KeyboardInterrupt):
        model.to_empty(device="cpu")
    assert bufferfix.held().pending > start
    monkeypatch.setattr(restore.Materialisation, "fill", real_fill)
    quiet(lambda model=model: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)
    del model
    gc.collect()
    assert bufferfix.held().pending == start


class MovesItsTable(nn.Module):
    """Values in a buffer, a plain attribute and a list attribute; its ``_apply`` moves the plain
    attribute too, so ``to_empty`` gives it empty memory as it does a buffer."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.register_buffer("buffer", torch.arange(4.0) * 2, persistent=False)
        self.table = torch.arange(6.0) / 7
        self.tables = [torch.arange(5.0) * 3]

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.table = fn(self.table)
        return self


def _changed(model):
    with torch.no_grad():
        model.buffer.mul_(3)
        model.table.mul_(3)
    return model


@pytest.mark.parametrize("flow, interrupted_at", [("meta build", 1), ("meta build", 2), ("meta build", 3),
                                                  ("changed, then moved to meta", 1),
                                                  ("changed, then moved to meta", 2)])
def test_an_interrupted_fill_leaves_every_kind_of_slot_marked_for_the_retry(monkeypatch, flow, interrupted_at):
    """The fill interrupted at the buffer, the attribute or the list entry: whatever holds empty
    memory then, an attribute as much as a buffer, is filled by the retry (the snapshot of a value
    changed before the move to meta, too), not kept as a value."""
    torch.manual_seed(0)
    if flow == "meta build":
        reference = MovesItsTable()
        with torch.device("meta"):
            model = MovesItsTable()
    else:
        reference = _changed(MovesItsTable())
        model = _changed(MovesItsTable()).to("meta")  # (the list stays real: only the module's _apply moves it)
    real_fill = restore.Materialisation.fill
    calls = []

    def interrupted_fill(self, group, target, failures, device=None):
        calls.append(1)
        if len(calls) == interrupted_at:
            raise KeyboardInterrupt
        return real_fill(self, group, target, failures, device)

    monkeypatch.setattr(restore.Materialisation, "fill", interrupted_fill)
    with pytest.raises(KeyboardInterrupt):
        model.to_empty(device="cpu")
    monkeypatch.setattr(restore.Materialisation, "fill", real_fill)
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


class FlakyConstructor(nn.Module):
    """Its constructor raises on every call while ``failing`` (a replay hitting OOM)."""

    failing = False

    def __init__(self):
        super().__init__()
        if FlakyConstructor.failing:
            raise RuntimeError(OOM)
        self.register_buffer("steps", torch.arange(5.0) * 0.5, persistent=False)
        self.linear = nn.Linear(2, 2)


def test_a_replay_that_raises_is_loud_and_a_retry_replays_again():
    reference, model = reference_and_meta(FlakyConstructor)
    FlakyConstructor.failing = True
    try:
        with pytest.warns(bufferfix.UnrecoverableBufferWarning) as caught:
            model.to_empty(device="cpu")
            loading_ends()
    finally:
        FlakyConstructor.failing = False
    [recovery] = [r for w in caught for r in w.message.recoveries]
    assert (recovery.name, recovery.reason) == ("steps", bufferfix.recovery.Reason.REPLAY_RAISED)
    quiet(lambda: model.to_empty(device="cpu"))  # the retry: marked unfilled, replayed again, exact
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_an_unrecoverable_buffer_is_named_again_on_every_retry():
    class Random(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("noise", torch.randn(3), persistent=False)

    with torch.device("meta"):
        model = Random()
    for _ in range(3):  # never "kept" as if it were a real value
        with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="noise"):
            model.to_empty(device="cpu")
            loading_ends()
    model.noise.copy_(torch.ones(3))  # the user writes it: from now on it is a value
    quiet(lambda: model.to_empty(device="cpu"))
    assert torch.equal(model.noise, torch.ones(3))


def test_a_recompute_function_that_raises_falls_back_to_the_replay():
    class Rope(Rotary):
        pass

    bufferfix.register_recompute(Rope, _raise(RuntimeError("broken recompute")))
    try:
        torch.manual_seed(0)
        reference = Rope(8)
        with torch.device("meta"):
            model = Rope(8)
        quiet(lambda: model.to_empty(device="cpu"))
        assert_matches_reference(model, reference)
    finally:
        from bufferfix.mechanism import recompute

        recompute.unregister_recompute(Rope)


def test_a_recompute_function_that_raises_with_no_replay_is_loud():
    @bufferfix.never_replay
    class Rope(Rotary):
        pass

    bufferfix.register_recompute(Rope, _raise(RuntimeError("broken recompute")))
    try:
        with torch.device("meta"):
            model = Rope(8)
        with pytest.warns(bufferfix.UnrecoverableBufferWarning, match="broken recompute"):
            model.to_empty(device="cpu")
            loading_ends()
    finally:
        from bufferfix.mechanism import recompute

        recompute.unregister_recompute(Rope)


class ResetsAfterMaterialising(Stack):
    """An override that runs its own initialisation after materialising; it raises."""

    def to_empty(self, *, device, recurse=True):
        super().to_empty(device=device, recurse=recurse)
        raise ValueError("reset_parameters failed")


def test_an_error_after_the_materialisation_leaves_the_buffers_exact():
    reference, model = reference_and_meta(ResetsAfterMaterialising)
    with pytest.raises(ValueError, match="reset_parameters failed"):
        model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_transformers_init_weights_raising_leaves_nothing_held_back(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x keeps buffers real in from_pretrained: nothing is held back")
    from test_transformers_loading import SinusoidalConfig, SinusoidalModel

    torch.manual_seed(0)
    reference = SinusoidalModel(SinusoidalConfig())
    reference.save_pretrained(tmp_path)
    seen, original = [], SinusoidalModel._init_weights

    def failing_init_weights(self, module):  # fails once, in the load (a replay later runs it fine)
        seen.append(self)
        if len(seen) == 1:
            raise ValueError("init failed")
        return original(self, module)

    monkeypatch.setattr(SinusoidalModel, "_init_weights", failing_init_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("error", bufferfix.UnrecoverableBufferWarning)
        with pytest.raises(ValueError, match="init failed"):
            SinusoidalModel.from_pretrained(tmp_path)
    assert broken_buffers(seen[0], reference) == []  # the loading model: filled although the load failed
    from bufferfix.integrations import transformers as integration

    assert integration._pending() == {}


def test_a_move_to_meta_that_raises_keeps_the_snapshots_of_what_it_moved():
    reference, _ = reference_and_meta()
    model = Stack()
    model.load_state_dict(reference.state_dict())
    error = RuntimeError("interrupted")
    undo = fail_in_apply(model.layers[3].linear, error)
    raises_its_own(lambda: model.to("meta"), error)
    undo()
    model.to("meta")
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_a_move_to_meta_after_an_interrupted_materialisation_snapshots_no_garbage():
    reference, model = reference_and_meta()
    undo = fail_in_apply(model.layers[2].linear, RuntimeError(OOM))
    real_fill = restore.Materialisation.fill
    restore.Materialisation.fill = lambda *args, **kwargs: None  # the fill after the error never happens
    try:
        with pytest.raises(RuntimeError):
            model.to_empty(device="cpu")
    finally:
        restore.Materialisation.fill = real_fill
        undo()
    model.to("meta")  # the garbage of layers 0-1 must not become their "snapshot"
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_load_state_dict_assign_that_raises_still_gives_buffers_their_values():
    reference, model = reference_and_meta()
    state = dict(reference.state_dict())
    state["unexpected.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="unexpected"):
        model.load_state_dict(state, assign=True)
    assert broken_buffers(model, reference) == []
    model.load_state_dict(reference.state_dict(), assign=True)
    assert_matches_reference(model, reference)


@pytest.mark.parametrize("call", ["dispatch_model", "load_checkpoint_in_model"])
def test_accelerate_call_that_raises_leaves_buffers_exact(call, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    torch.manual_seed(0)
    reference = Stack()
    with accelerate.init_empty_weights(include_buffers=True):
        model = Stack()
    with pytest.raises(Exception):  # noqa: B017 - each call raises its own kind; the test is what follows
        if call == "dispatch_model":
            accelerate.dispatch_model(model, device_map={"": "no-such-device"})
        else:
            accelerate.load_checkpoint_in_model(model, str(tmp_path / "missing.safetensors"))
    assert broken_buffers(model, reference) == []


def test_restoring_passes_the_exception_through_unchanged():
    _, model = reference_and_meta()
    error = MemoryError("out of host memory")
    with pytest.raises(MemoryError) as caught:
        with Restoring(model, device=torch.device("cpu")):
            raise error
    assert caught.value is error and caught.value.__context__ is None


# --------------------------------------------------------------------------- after the fault

def test_after_a_fault_other_models_and_fresh_builds_are_exact():
    reference, earlier = reference_and_meta(Zoo)
    _, victim = reference_and_meta()
    fail_in_apply(victim.layers[2].linear, RuntimeError(OOM))
    with pytest.raises(RuntimeError):
        victim.to_empty(device="cpu")
    quiet(lambda: earlier.to_empty(device="cpu"))  # a model built before the fault
    earlier.load_state_dict(reference.state_dict())
    assert_matches_reference(earlier, reference)
    fresh_reference, fresh = reference_and_meta()  # a fresh build of the failing class
    quiet(lambda: fresh.to_empty(device="cpu"))
    fresh.load_state_dict(fresh_reference.state_dict())
    assert_matches_reference(fresh, fresh_reference)


def test_a_second_to_empty_of_a_materialised_model_is_exact():
    reference, model = reference_and_meta(Zoo)
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert_matches_reference(model, reference)


def test_a_model_only_partly_on_meta_keeps_its_real_parts_values():
    reference, model = reference_and_meta()
    real = Layer(8)  # loaded for real, with a value no constructor gives
    real.rotary.inv_freq.mul_(3.0)
    model.layers[4] = real
    expected = real.rotary.inv_freq.clone()
    reference.layers[4].rotary.inv_freq.copy_(expected)
    quiet(lambda: model.to_empty(device="cpu"))
    model.load_state_dict(reference.state_dict())
    assert torch.equal(model.layers[4].rotary.inv_freq, expected)
    assert_matches_reference(model, reference)


# --------------------------------------------------------------------------- soak, threads, processes

def _cycles(count):
    for _ in range(count):
        with torch.device("meta"):
            model = Stack(layers=2)
        model.to_empty(device="cpu")
        with torch.device("meta"):
            failing = Stack(layers=2)
        fail_in_apply(failing.layers[1].linear, RuntimeError(OOM))
        try:
            failing.to_empty(device="cpu")
        except RuntimeError:
            pass
        Stack(layers=1).to("meta").to_empty(device="cpu")


@pytest.mark.parametrize("cycles", [pytest.param(1000, id="1000"),
                                    pytest.param(20000, id="20000", marks=pytest.mark.slow)])
def test_soak_leaves_the_side_tables_at_their_starting_size(cycles):
    import gc

    gc.collect()
    start = bufferfix.held()
    _cycles(cycles)
    gc.collect()
    assert bufferfix.held() == start


def test_threads_building_and_materialising_different_models_at_once():
    builds = [Stack, Zoo, lambda: Sinusoidal(12, 6), lambda: Layer(4)]
    references = {}
    for index, build in enumerate(builds):
        torch.manual_seed(0)
        references[index] = build()
    failures, start = [], threading.Barrier(8)

    def worker(index):
        try:
            start.wait()
            for _ in range(15):
                with torch.device("meta"):
                    model = builds[index % len(builds)]()
                model.to_empty(device="cpu")
                model.load_state_dict(references[index % len(builds)].state_dict())
                assert_matches_reference(model, references[index % len(builds)])
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threads = [threading.Thread(target=worker, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_a_model_built_in_one_thread_and_materialised_in_another():
    reference, box = Zoo(), {}
    torch.manual_seed(0)
    reference = Zoo()

    def build():
        with torch.device("meta"):
            box["model"] = Zoo()

    thread = threading.Thread(target=build)
    thread.start()
    thread.join()
    quiet(lambda: box["model"].to_empty(device="cpu"))
    box["model"].load_state_dict(reference.state_dict())
    assert_matches_reference(box["model"], reference)


def test_a_meta_model_saved_and_loaded_in_a_fresh_interpreter_is_loud(tmp_path):
    """No recipe crosses torch.save: the fresh process must name every buffer it cannot fill."""
    tests = str(__import__("pathlib").Path(__file__).parent)
    code = textwrap.dedent("""
        import sys, warnings
        sys.path.insert(0, %r)
        import bufferfix, torch
        from models import Zoo
        with torch.device("meta"):
            model = Zoo()
        torch.save(model, %r)
    """ % (tests, str(tmp_path / "meta.pt")))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    code = textwrap.dedent("""
        import sys, warnings
        sys.path.insert(0, %r)
        import bufferfix, torch
        model = torch.load(%r, weights_only=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.to_empty(device="cpu")
            from compare import loading_ends
            loading_ends()
        named = {r.name for w in caught if hasattr(w.message, "recoveries") for r in w.message.recoveries}
        from compare import non_persistent_buffers
        tensors = non_persistent_buffers(model)
        named_tensors = {id(tensors[name]) for name in named if name in tensors}
        # a buffer sharing its tensor with a named one is the same memory, reported once
        print(len(named), [name for name, tensor in tensors.items() if id(tensor) not in named_tensors])
    """ % (tests, str(tmp_path / "meta.pt")))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count, silent = result.stdout.split(" ", 1)
    assert int(count) > 0 and silent.strip() == "[]"
